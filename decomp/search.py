"""The realized optimum ``λ̂ = argmax_λ ΔJ(λ)`` as a distribution: a grid over real
counterfactual steps, refined near the best point, and a bootstrap over prompt groups.

``ΔJ(λ) = J(θ + u(λ)) − J(θ + u_RL)`` is evaluated with real counterfactual optimizer steps
(forward passes only), so ``λ̂`` is the best coefficient for *this* update of *this* optimizer —
the ground truth the estimators are judged against (docs/method.md §3.5, docs/estimators.md
§5.2). ``ΔJ(0) = 0`` is known without evaluation. Nothing here reads ``λ*`` or any estimate: the
grid is fixed by its bound, so ``λ̂`` cannot be close to ``λ*`` by construction.

The search (:func:`grid_search`; :func:`realized_optimum` for a gain function):

1. **grid**: ``0`` and ``±bound·10^(−k/points_per_decade)``, ``k = 0 … decades·points_per_decade``
   (default: one point per decade over 9 decades, ``|λ| ∈ {1e−3, 1e−2, …, 1e6}`` for the bound
   1e6 — the span of the ``λ̂`` of the built-in model's runs, ``~2e−2 … 1e6``, both signs — 20
   evaluations in one batch);
2. **refinement**: ``refine_points`` coefficients strictly between the two evaluated neighbours
   ``a < λ_b < c`` of the best point ``λ_b`` (log-spaced when ``a`` and ``c`` have ``λ_b``'s sign,
   else evenly spaced), one batch per round, around the new best each round, until both neighbours
   lie within ``rtol·|λ_b|`` of it. Each round shrinks the bracket's log-span by ``2/(refine_points
   + 1)``: from one decade each side, 6 points give spacings of ×1.93, ×1.21, ×1.055 (three
   rounds for ``rtol = 0.1``; 38 evaluations in all). With the groups' contributions, the
   refinement also stops once both neighbours are within the groups' noise of the best
   (:func:`_within_noise`: the paired difference within two standard errors of 0): a finer point
   would only resolve sampling noise, and :func:`bootstrap_optimum` says how wide it is;
3. ``λ̂`` is the best point evaluated (the smaller ``|λ|``, then the smaller ``λ``, on a tie; a
   non-finite ``ΔJ`` counts as ``−∞``). ``reason`` is ``""`` for a resolved maximum (``λ̂ = 0``
   included: no coefficient beats leaving the MTP term out), :data:`RISING` when ``λ̂`` is
   ``±bound`` (only its sign is informative), :data:`BUDGET` when the next round would exceed
   ``max_evaluations`` before ``λ̂`` is resolved, :data:`NO_EFFECT` when every evaluation is
   exactly 0.

Nothing assumes one peak: the grid sees every decade on both sides, and the refinement follows
whichever point is best. With each evaluation's contributions of the ``G`` prompt groups
(``parts[k, g]``, each over the batch's token normaliser, so ``Σ_g parts[k, g] = ΔJ(λ_k)``),
:func:`bootstrap_optimum` resamples the groups ``B`` times (``numpy.random.default_rng(seed)``,
arithmetic only): resample ``b`` has the curve ``S_b(λ_k) = Σ_g w_bg·parts[k, g]`` (``w_b`` the
multinomial counts) and the optimum ``λ̂_b = argmax_k S_b(λ_k)`` over the evaluated points (a
resample's token total is a common positive factor of its curve: the argmax needs no
renormalisation). Then

- ``interval``: the 2.5% and 97.5% percentiles of ``λ̂_b`` (``inverted_cdf``: both ends are
  evaluated coefficients);
- ``positive_prob = P_b(λ̂_b > 0)``;
- ``near_optimal``: the evaluated ``λ_k`` the data cannot tell from ``λ̂`` — those with
  ``S_b(λ_k) ≥ S_b(λ̂)`` in at least 2.5% of the resamples (a one-sided paired bootstrap test at
  2.5%; ``λ̂`` itself always) — sorted; it may have gaps (two peaks) and includes ``0`` when
  ``ΔJ(λ̂)`` is not distinguishable from 0.

The bootstrap lives on the evaluated points: fine (``rtol``) near ``λ̂``, a decade apart far from
it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypedDict, Unpack
from dataclasses import dataclass, field

import numpy as np
import torch

from decomp import optim as cf_optim
from decomp.checks import check_number

DEFAULT_SEARCH_BOUND = 1e6  # largest |λ| tried
SEARCH_DECADES = 9  # the grid's decades below the bound (1e−3 … 1e6 for the default bound)
POINTS_PER_DECADE = 1  # grid points per decade on each side
REFINE_POINTS = 6  # coefficients per refinement round
SEARCH_RTOL = 0.1  # ΔJ is flat at its maximum: 10% in λ costs ~1% of the gain at a parabola's peak
MAX_SEARCH_EVALUATIONS = 44  # the grid (20) and four refinement rounds (three resolve rtol = 0.1)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
RISING = "the realized gain keeps rising up to the search bound |λ| = {bound:g}"
BUDGET = ("the search's budget of {evaluations} evaluations ran out before λ̂ was resolved to a relative "
          "{rtol:g}: λ̂ is the best point evaluated")
BUDGET_PREFIX = BUDGET.split("{", 1)[0]


def ran_out_of_budget(reason: str) -> bool:
    """Whether a search's ``reason`` is :data:`BUDGET`: its ``λ̂`` is the best point evaluated,
    a usable coefficient that is only not resolved to ``rtol``."""
    return isinstance(reason, str) and reason.startswith(BUDGET_PREFIX)


NO_EFFECT = "ΔJ(λ) = 0 at every λ tried: the MTP displacement does not move J (or J is flat: zero advantages)"

# evaluate(coefs) -> (ΔJ at each coefficient [K], each group's contribution [K, G] or None)
Evaluate = Callable[[Sequence[float]], tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class Optimum:
    coef: float  # λ̂ (nan when undefined)
    gain: float  # ΔJ(λ̂) (0 at λ̂ = 0)
    reason: str  # "" for a resolved maximum
    evaluations: int  # coefficients evaluated by the search (``extra`` not counted)
    interval: tuple[float, float] = (math.nan, math.nan)  # 95% bootstrap percentile interval of λ̂
    positive_prob: float = math.nan  # P(λ̂ > 0) over the bootstrap
    near_optimal: tuple[float, ...] = ()  # evaluated λ not distinguishable from λ̂ (module docstring)
    coefs: tuple[float, ...] = ()  # every evaluated coefficient, sorted (0 included)
    gains: tuple[float, ...] = ()  # ΔJ at ``coefs``
    extra_gains: tuple[float, ...] = field(default=())  # ΔJ at the ``extra`` coefficients


def grid_size(points_per_decade: int = POINTS_PER_DECADE, decades: int = SEARCH_DECADES) -> int:
    """Evaluations of the grid (``0`` is not evaluated): ``2·(decades·points_per_decade + 1)``."""
    return 2 * (decades * points_per_decade + 1)


def search_grid(bound: float, points_per_decade: int = POINTS_PER_DECADE, decades: int = SEARCH_DECADES
                ) -> list[float]:
    """The grid of step 1 (module docstring), ascending, without 0."""
    n = decades * points_per_decade
    top = math.log10(bound)
    mags = [10.0 ** (top - k / points_per_decade) if k else float(bound) for k in range(n, -1, -1)]
    return [-m for m in reversed(mags)] + mags


def check_search(optimizer: object, bound: float, evaluations: int, rtol: float) -> None:
    """``ValueError`` naming the argument for a search that cannot run as asked."""
    b = check_number(bound, "search_bound")
    if not b > 0:
        raise ValueError(f"search_bound must be finite and positive, got {bound}")
    if isinstance(evaluations, bool) or not isinstance(evaluations, int) or evaluations < grid_size():
        raise ValueError(f"search_evaluations must be an integer >= {grid_size()} (the grid), got {evaluations!r}")
    r = check_number(rtol, "search_rtol")
    if not 0 < r < 1:
        raise ValueError(f"search_rtol must be in (0, 1), got {rtol}")
    if isinstance(optimizer, torch.optim.Optimizer) and not isinstance(
        optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
    ):
        raise ValueError(f"search=True needs an optimizer decomp can step counterfactually (SGD, Adam, AdamW); "
                         f"optimizer is {type(optimizer).__name__}")
    if not isinstance(optimizer, (str, torch.optim.Optimizer, cf_optim.SGD, cf_optim.AdamW)):
        raise ValueError(f"search=True needs an optimizer decomp can step counterfactually; optimizer is "
                         f"{type(optimizer).__name__}")


class GridOptions(TypedDict, total=False):
    """The options of :func:`grid_search` that :func:`realized_optimum` passes on."""

    extra: Sequence[float]
    bound: float
    max_evaluations: int
    rtol: float
    moves_objective: bool
    points_per_decade: int
    decades: int
    refine_points: int
    resamples: int
    seed: int


def realized_optimum(gain: Callable[[float], float], *, row_sets: Sequence[torch.Tensor] | None = None,
                     **options: Unpack[GridOptions]) -> Optimum:
    """``argmax_λ gain(λ)`` over ``|λ| ≤ bound`` by :func:`grid_search` (``options``: its keyword
    arguments); ``gain(0)`` is taken as 0.

    ``gain``: a :class:`decomp.realized.RealizedGain` (its batched ``at_coefs``, with each row
    set's contribution when ``row_sets`` is given: then the bootstrap fields are filled) or any
    callable of one coefficient (evaluated one at a time, no bootstrap). ``extra``: coefficients
    evaluated in the grid's batch, reported in ``extra_gains`` and never candidates for ``λ̂``
    (e.g. ``λ*``). The grid depends on no estimate."""
    at_coefs = getattr(gain, "at_coefs", None)
    if callable(at_coefs):
        def evaluate(coefs: Sequence[float]) -> tuple[np.ndarray, np.ndarray | None]:
            return at_coefs(list(coefs), None if row_sets is None else list(row_sets))
    else:
        def evaluate(coefs: Sequence[float]) -> tuple[np.ndarray, np.ndarray | None]:
            return np.array([0.0 if c == 0.0 else float(gain(c)) for c in coefs], dtype=np.float64), None
    return grid_search(evaluate, **options)


NOISE_Z = 2.0  # a neighbour within this many standard errors of the best stops the refinement


def _within_noise(best: np.ndarray, other: np.ndarray) -> bool:
    """Whether the groups' paired differences ``d_g`` of ``ΔJ(λ̂) − ΔJ(λ)`` leave the difference
    within :data:`NOISE_Z` standard errors of 0: ``Σ d_g ≤ z·√(G/(G−1)·Σ_g (d_g − d̄)²)``."""
    d = best - other
    g = d.size
    return float(d.sum()) <= NOISE_Z * math.sqrt(g / (g - 1) * float(np.sum((d - d.mean()) ** 2)))


def grid_search(
    evaluate: Evaluate,
    *,
    extra: Sequence[float] = (),
    bound: float = DEFAULT_SEARCH_BOUND,
    max_evaluations: int = MAX_SEARCH_EVALUATIONS,
    rtol: float = SEARCH_RTOL,
    moves_objective: bool = True,
    points_per_decade: int = POINTS_PER_DECADE,
    decades: int = SEARCH_DECADES,
    refine_points: int = REFINE_POINTS,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Optimum:
    """The search of the module docstring on ``evaluate(coefs) -> (ΔJ [K], parts [K, G] or None)``
    (one call per batch: the grid with ``extra``, then one per refinement round); the bootstrap
    fields when ``evaluate`` gives the parts of at least two groups."""
    grid = search_grid(bound, points_per_decade, decades)
    if max_evaluations < len(grid):
        raise ValueError(f"max_evaluations ({max_evaluations}) is below the grid's {len(grid)} points")
    if not (isinstance(refine_points, int) and refine_points >= 1):
        raise ValueError(f"refine_points must be a positive integer, got {refine_points!r}")
    extra = [float(c) for c in extra]
    totals, parts = evaluate(grid + extra)
    totals = np.asarray(totals, dtype=np.float64)
    seen: dict[float, float] = {0.0: 0.0, **dict(zip(grid, totals[: len(grid)].tolist(), strict=True))}
    extra_gains = tuple(totals[len(grid):].tolist())
    groups = None if parts is None else np.asarray(parts, dtype=np.float64).shape[1]
    rows: dict[float, np.ndarray] = {}
    if groups is not None:
        parts = np.asarray(parts, dtype=np.float64)
        rows = {0.0: np.zeros(groups), **{c: parts[i] for i, c in enumerate(grid)}}
    reason = ""
    while True:
        best = _best(seen)
        if abs(best) >= bound:
            reason = RISING.format(bound=bound)
            break
        keys = sorted(seen)
        i = keys.index(best)
        lo, hi = keys[i - 1], keys[i + 1]
        if best == 0.0 or max(hi - best, best - lo) <= rtol * abs(best):
            break
        if groups is not None and groups >= 2 and all(_within_noise(rows[best], rows[c]) for c in (lo, hi)):
            break  # the groups cannot tell either neighbour from the best: finer points resolve noise
        new = [c for c in _between(lo, hi, best, refine_points) if c not in seen]
        if not new:  # the bracket is at float resolution
            break
        if len(seen) - 1 + len(new) > max_evaluations:
            reason = BUDGET.format(evaluations=max_evaluations, rtol=rtol)
            break
        t, pr = evaluate(new)
        seen.update(zip(new, np.asarray(t, dtype=np.float64).tolist(), strict=True))
        if groups is not None and pr is not None:
            rows.update({c: np.asarray(pr, dtype=np.float64)[j] for j, c in enumerate(new)})
    n = len(seen) - 1
    coefs = tuple(sorted(seen))
    gains = tuple(seen[c] for c in coefs)
    if all(v == 0.0 for v in seen.values()) and (n >= 2 or not moves_objective):
        return Optimum(math.nan, math.nan, NO_EFFECT, n, coefs=coefs, gains=gains, extra_gains=extra_gains)
    best = _best(seen)
    out = Optimum(best, seen[best], reason, n, coefs=coefs, gains=gains, extra_gains=extra_gains)
    if groups is not None and groups >= 2:
        interval, prob, near = bootstrap_optimum(np.array(coefs), np.stack([rows[c] for c in coefs]),
                                                 resamples=resamples, seed=seed)
        out = Optimum(out.coef, out.gain, reason, n, interval, prob, near, coefs, gains, extra_gains)
    return out


def _order_key(c: float) -> tuple[float, float]:
    return (abs(c), c)


def _best(seen: dict[float, float]) -> float:
    """The best evaluated coefficient: the largest finite gain; the smaller ``|λ|``, then the smaller
    ``λ`` on a tie (non-finite gains count as ``−∞``)."""
    def value(c: float) -> float:
        v = seen[c]
        return v if math.isfinite(v) else -math.inf
    top = max(value(c) for c in seen)
    return min((c for c in seen if value(c) == top), key=_order_key)


def _between(lo: float, hi: float, best: float, points: int) -> list[float]:
    """``points`` coefficients strictly inside ``(lo, hi)``: log-spaced when both ends have
    ``best``'s sign, else evenly spaced."""
    if lo * best > 0 and hi * best > 0:
        s = math.copysign(1.0, best)
        a, b = math.log(abs(lo)), math.log(abs(hi))
        return [s * math.exp(a + (b - a) * k / (points + 1)) for k in range(1, points + 1)]
    return [lo + (hi - lo) * k / (points + 1) for k in range(1, points + 1)]


def bootstrap_optimum(coefs: np.ndarray, parts: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED, level: float = LEVEL
                      ) -> tuple[tuple[float, float], float, tuple[float, ...]]:
    """``(interval, positive_prob, near_optimal)`` of the module docstring from the evaluated
    coefficients ``coefs [K]`` and the groups' contributions ``parts [K, G]`` (``G ≥ 2``; a
    non-finite contribution makes that coefficient's resampled gains ``−∞``)."""
    coefs = np.asarray(coefs, dtype=np.float64)
    parts = np.asarray(parts, dtype=np.float64)
    k, groups = parts.shape
    if groups < 2 or k != coefs.size:
        return (math.nan, math.nan), math.nan, ()
    order = sorted(range(k), key=lambda i: _order_key(float(coefs[i])))  # ties: smaller |λ| first
    c, p = coefs[order], parts[order]
    bad = ~np.all(np.isfinite(p), axis=1)
    p = np.where(np.isfinite(p), p, 0.0)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(groups, np.full(groups, 1.0 / groups), size=resamples).astype(np.float64)
    curves = p @ weights.T  # [K, B]: S_b(λ_k)
    curves[bad] = -np.inf
    full = p.sum(axis=1)
    full[bad] = -np.inf
    best = int(np.argmax(full))
    hats = c[np.argmax(curves, axis=0)]
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(hats, [alpha, 1.0 - alpha], method="inverted_cdf")
    near = np.mean(curves >= curves[best][None, :], axis=1) >= alpha
    near[best] = True
    return (float(lo), float(hi)), float(np.mean(hats > 0)), tuple(float(x) for x in np.sort(c[near]))
