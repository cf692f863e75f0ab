"""Sampling errors of a decomposition record from its prompt groups' contributions
(docs/estimators.md §5).

The evaluation objective is a token mean over the batch, ``J = Σ_g S_g / N`` with ``S_g`` the
sum of group ``g``'s importance-weighted advantages and ``N = Σ_g n_g`` the batch's response
tokens; the prompt group, not the sequence, is the independent unit (advantages are normalised
inside it). Every term of the decomposition is linear in ``J``, so it is a sum of the groups'
contributions ``T = Σ_g t_g`` (:func:`decomp.evaluation.grouped_side`). ``N`` couples the
groups: ``T`` is a ratio estimator, and its standard error is the delta method's,

    SE(T)² = G/(G−1) · Σ_g (t_g − T·n_g/N)²,

which is ``sd_g/√G`` of the contributions ``G·t_g`` when every group has the same number of
tokens. ``λ* = (C₁ + X₁)/(2P₁)`` is a ratio of terms: its error is the delete-one-group
jackknife's (the normaliser cancels in the ratio). ``noise_groups = G·SE(C)²/C²`` is the number
of groups at which ``C``'s signal equals its noise along this direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# the record fields that get a standard error (``<name>_se``), in record order
SE_FIELDS = ("correlation", "cross", "penalty", "predicted", "realized", "correlation_unit", "cross_unit",
             "penalty_unit")


def ratio_se(contributions: Sequence[float], tokens: Sequence[float]) -> float:
    """The standard error of ``T = Σ_g t_g`` over the batch's token count (module docstring);
    ``nan`` with fewer than two groups or a non-finite contribution."""
    t = np.asarray(contributions, dtype=np.float64)
    n = np.asarray(tokens, dtype=np.float64)
    groups = t.size
    if groups < 2 or not np.all(np.isfinite(t)) or n.sum() <= 0:
        return math.nan
    total = t.sum()
    resid = t - total * n / n.sum()
    return float(math.sqrt(groups / (groups - 1) * float(np.sum(resid * resid))))


def jackknife_lambda_star(unit: np.ndarray) -> float:
    """The delete-one-group jackknife error of ``λ* = (C₁ + X₁)/(2P₁)`` from the groups' unit
    terms (rows ``[c₁, x₁, p₁]``); ``nan`` with fewer than two groups, and where ``λ*`` or a
    delete-one value is undefined (``P₁ ≤ 0``: then one group decides whether there is an optimum)."""
    groups = unit.shape[0]
    if groups < 2:
        return math.nan
    total = unit.sum(axis=0)
    rest = total[None, :] - unit  # the terms without group g (the normaliser cancels in the ratio)
    if total[2] <= 0 or np.any(rest[:, 2] <= 0):
        return math.nan
    loo = (rest[:, 0] + rest[:, 1]) / (2 * rest[:, 2])
    return float(math.sqrt((groups - 1) / groups * float(np.sum((loo - loo.mean()) ** 2))))


def group_errors(group_terms: Sequence[Sequence[float]], group_realized: Sequence[float],
                 tokens: Sequence[float]) -> dict[str, float]:
    """``<field>_se`` for :data:`SE_FIELDS`, ``lambda_star_se``, ``n_groups`` and ``noise_groups``
    from each group's terms ``(C₁, X₁, P₁, C, X, P)`` (:class:`decomp.evaluation.Terms`), its
    realized change and its response tokens."""
    terms = np.asarray(group_terms, dtype=np.float64).reshape(-1, 6)
    c1, x1, p1, c, x, p = terms.T
    parts = {"correlation": c, "cross": x, "penalty": p, "predicted": c + x - p,
             "realized": np.asarray(group_realized, dtype=np.float64), "correlation_unit": c1, "cross_unit": x1,
             "penalty_unit": p1}
    out: dict[str, float] = {f"{name}_se": ratio_se(parts[name], tokens) for name in SE_FIELDS}
    out["lambda_star_se"] = jackknife_lambda_star(terms[:, :3])
    correlation = float(c.sum())
    se = out["correlation_se"]
    out["n_groups"] = int(terms.shape[0])
    out["noise_groups"] = terms.shape[0] * se * se / (correlation * correlation) \
        if correlation != 0 and math.isfinite(se) else math.nan
    return out
