"""The realized optimum ``λ̂ = argmax_λ ΔJ(λ)``: a bracketed one-dimensional search.

``ΔJ(λ) = J(θ + u(λ)) − J(θ + u_RL)`` is evaluated with real counterfactual optimizer steps
(forward passes only), so ``λ̂`` is the best coefficient for *this* update of *this* optimizer —
the ground truth the estimators are judged against (docs/method.md §3). ``ΔJ(0) = 0`` is known
without evaluation.

The search (:func:`realized_optimum`):

1. from a start ``s`` (``|λ*|`` when the quadratic model has an optimum, else ``|coef|``),
   evaluate ``ΔJ(s)`` and, unless it beats ``ΔJ(0) = 0``, ``ΔJ(−s)`` (a unimodal curve that
   rises from 0 towards ``+s`` has its maximum on that side); if neither beats 0, the maximum
   lies in ``(−s, s)``;
2. otherwise expand on the better side, ``λ ← EXPANSION·λ``, until the gain falls (a bracket
   ``a < b < c`` with ``ΔJ(b)`` above both ends) or ``|λ|`` reaches the bound — then ``λ̂`` is the
   bound and ``reason`` says that the gain was still rising there (Adam's update saturates as
   ``λ`` grows, so a plateau is common);
3. refine inside the bracket with Brent's method (``scipy.optimize.minimize_scalar``, started
   from the bracket's three known points, which cost nothing again) to a relative accuracy
   ``rtol`` in ``λ``.

Every evaluation counts against ``max_evaluations``; ``λ̂`` is the best point evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from scipy.optimize import minimize_scalar

from decomp import optim as cf_optim
from decomp.checks import check_number

DEFAULT_SEARCH_BOUND = 1e6  # largest |λ| tried
MAX_SEARCH_EVALUATIONS = 25
SEARCH_RTOL = 0.1  # ΔJ is flat at its maximum: 10% in λ costs ~1% of the gain at a parabola's peak
EXPANSION = 4.0
RISING = "the realized gain keeps rising up to the search bound |λ| = {bound:g}"
NO_EFFECT = "ΔJ(λ) = 0 at every λ tried: the MTP displacement does not move J (or J is flat: zero advantages)"


@dataclass(frozen=True)
class Optimum:
    coef: float  # λ̂ (nan when undefined)
    gain: float  # ΔJ(λ̂) (0 at λ̂ = 0)
    reason: str  # "" for an interior maximum
    evaluations: int


class _Budget(Exception):
    pass


def check_search(optimizer: object, bound: float, evaluations: int, rtol: float) -> None:
    """``ValueError`` naming the argument for a search that cannot run as asked."""
    b = check_number(bound, "search_bound")
    if not b > 0:
        raise ValueError(f"search_bound must be finite and positive, got {bound}")
    if isinstance(evaluations, bool) or not isinstance(evaluations, int) or evaluations < 3:
        raise ValueError(f"search_evaluations must be an integer >= 3, got {evaluations!r}")
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


def realized_optimum(
    gain: Callable[[float], float],
    *,
    start: float,
    bound: float = DEFAULT_SEARCH_BOUND,
    max_evaluations: int = MAX_SEARCH_EVALUATIONS,
    rtol: float = SEARCH_RTOL,
    moves_objective: bool = True,
) -> Optimum:
    """``argmax_λ gain(λ)`` over ``|λ| ≤ bound`` (module docstring); ``gain(0)`` is taken as 0."""
    seen: dict[float, float] = {0.0: 0.0}

    def f(lam: float) -> float:
        lam = float(min(max(lam, -bound), bound))
        if lam not in seen:
            if len(seen) > max_evaluations:
                raise _Budget
            value = gain(lam)
            seen[lam] = value if math.isfinite(value) else -math.inf
        return seen[lam]

    s = min(abs(start), bound) if math.isfinite(start) and start != 0 else min(1.0, bound)
    try:
        bracket, reason = _bracket(f, s, bound)
        if bracket is not None:
            _refine(f, bracket, rtol)
    except _Budget:
        reason = ""
    n = len(seen) - 1
    if all(v == 0.0 for v in seen.values()) and (n >= 2 or not moves_objective):
        return Optimum(math.nan, math.nan, NO_EFFECT, n)
    best = max(seen, key=lambda k: (seen[k], -abs(k)))
    return Optimum(best, seen[best], reason, n)


def _bracket(f: Callable[[float], float], s: float, bound: float) -> tuple[tuple[float, float, float] | None, str]:
    """Three points ``(a, b, c)`` with ``f(b)`` at least both ends' (the maximum between ``a``
    and ``c``), or ``(None, reason)`` when the gain is still rising at the bound."""
    up = f(s)
    down = f(-s) if up <= 0 else -math.inf
    if up <= 0 and down <= 0:
        return (-s, 0.0, s), ""
    d = 1.0 if up > 0 else -1.0
    a, b, fb = 0.0, d * s, max(up, down)
    while abs(b) < bound:
        c = d * min(abs(b) * EXPANSION, bound)
        fc = f(c)
        if fc < fb:
            return (a, b, c), ""
        a, b, fb = b, c, fc
    return None, RISING.format(bound=bound)


def _refine(f: Callable[[float], float], bracket: tuple[float, float, float], rtol: float) -> None:
    """Brent's method on ``−f`` from the bracket (its evaluations land in ``f``'s cache)."""
    try:
        minimize_scalar(lambda x: -f(x), bracket=bracket, method="brent", options={"xtol": rtol, "maxiter": 500})
    except ValueError:
        pass  # a flat bracket (ties): the best point evaluated stands
