"""Estimators of the optimal MTP coefficient without Hessians: the ladder of docs/estimators.md §4.

All estimators share one projection formula on per-token changes ``a_t`` (what the MTP
direction does to the main log-probs) and ``b_t`` (what the RL updates do):

- ``reference``: ``c · mean_{all B×T}(a·b / (a² + 1e-8))`` — the public implementation's
  formula. The mean runs over the whole response-shaped tensor, padding included; as in verl,
  main and old log-probs are zero at padding, so padded positions add 0 to the sum but count in
  the denominator. Pass response-shaped ``[B, T_resp]`` tensors to reproduce it exactly.
- ``masked`` (default): the same mean over response tokens only, ``Σ_M a·b/(a²+1e-8) / Σ M``.
- ``pooled``: the least-squares slope ``c · Σ_M a·b / Σ_M a²`` (0 when ``Σ_M a² = 0``: the
  MTP direction does not move the log-probs, so there is nothing to scale).

Levels: **proxy** uses log-prob differences ``a = m − ℓ^old``, ``b = ℓ − ℓ^old`` (no extra
pass); **jvp** uses exact first-order changes ``a = ∇ℓ·δ₁``, ``b = ∇ℓ·u_RL`` (one forward-mode
pass each); **exact** is ``λ*`` of :func:`decomp.decomposition.decompose`. Each is registered as
a coefficient rule in :mod:`decomp.rules`, the one list of estimators.

``scale`` is the user's coefficient ``c``; the reference implementation passes ``c / K`` per
head for ``K`` MTP heads. Every estimator returns a 0-dim tensor (no gradient), ``nan`` when the
mask is empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from decomp.checks import (
    Params,
    check_finite,
    check_mask,
    check_number,
    check_same_shape,
)
from decomp.curvature import jvp_logprobs
from decomp.decomposition import Decomposition

PROXY_EPS = 1e-8
Reduction = Literal["reference", "masked", "pooled"]
REDUCTIONS: tuple[str, ...] = ("reference", "masked", "pooled")


def projection_coefficient(
    a: Tensor, b: Tensor, mask: Tensor, scale: float, reduction: Reduction = "masked"
) -> Tensor:
    """The shared formula: scale times the projection of ``b`` on ``a`` (see module docstring)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_same_shape(a=a, b=b, mask=mask)
    check_finite(a, "a")
    check_finite(b, "b")
    scale = check_number(scale, "scale")
    return _reductions(a, b, check_mask(mask), scale, (reduction,))[reduction]


PROXY_STATISTICS = ("ratio_sum", "count", "numel", "ab_sum", "aa_sum")


def proxy_statistics(a: Tensor, b: Tensor, m: Tensor) -> Tensor:
    """The sums every reduction is a function of, as one float64 vector (``PROXY_STATISTICS``):
    ``Σ_M a·b/(a²+1e-8)``, ``Σ M``, the number of entries, ``Σ_M a·b`` and ``Σ_M a²``.

    Sums add across shards, so adding the vectors of several ranks (an all-reduce) and applying
    :func:`coefficient_from_statistics` gives exactly the estimate on the concatenated batch.
    ``m`` must be boolean and validated.
    """
    with torch.no_grad():
        a = a.detach()
        b = b.detach()
        mf = m.to(a.dtype)
        ab = mf * a * b
        return torch.stack([
            (ab / (a * a + PROXY_EPS)).sum(dtype=torch.float64),
            mf.sum(dtype=torch.float64),
            torch.tensor(float(a.numel()), dtype=torch.float64, device=a.device),
            ab.sum(dtype=torch.float64),
            (mf * a * a).sum(dtype=torch.float64),
        ])


def coefficient_from_statistics(stats: Tensor, scale: float, reduction: Reduction = "masked") -> float:
    """An estimator's value from :func:`proxy_statistics` (module docstring); ``nan`` when the
    mask is empty; ``pooled`` is 0 when ``Σ_M a² = 0``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    ratio_sum, count, numel, ab_sum, aa_sum = (float(x) for x in stats)
    if count == 0:
        return math.nan
    if reduction == "reference":
        return scale * ratio_sum / numel
    if reduction == "masked":
        return scale * ratio_sum / count
    return 0.0 if aa_sum == 0.0 else scale * ab_sum / aa_sum


def _reductions(a: Tensor, b: Tensor, m: Tensor, scale: float, which: tuple[str, ...]) -> dict[str, Tensor]:
    """The formula for several reductions at once, on validated inputs (``m`` boolean)."""
    with torch.no_grad():
        a = a.detach()
        b = b.detach()
        n = int(m.sum())
        if n == 0:
            nan = torch.tensor(math.nan, dtype=a.dtype, device=a.device)
            return {r: nan for r in which}
        mf = m.to(a.dtype)
        out = {}
        if "reference" in which or "masked" in which:
            total = (mf * (a * b / (a * a + PROXY_EPS))).sum()
            if "reference" in which:
                out["reference"] = scale * total / a.numel()
            if "masked" in which:
                out["masked"] = scale * total / n
        if "pooled" in which:
            den = (mf * a * a).sum()
            out["pooled"] = (
                torch.zeros((), dtype=a.dtype, device=a.device) if float(den) == 0.0 else scale * (mf * a * b).sum() / den
            )
        return out


def _proxy_terms(mtp_logp: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    check_same_shape(mtp_logp=mtp_logp, logp=logp, old_logp=old_logp, mask=mask)
    check_finite(mtp_logp, "mtp_logp")
    check_finite(logp, "logp")
    check_finite(old_logp, "old_logp")
    return mtp_logp - old_logp, logp - old_logp


def reference_coefficient(
    mtp_logp: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor, scale: float
) -> Tensor:
    """The public implementation's proxy: ``c · mean(a·b/(a²+1e-8))`` over all ``B×T`` entries.

    ``a = m − ℓ^old``, ``b = ℓ − ℓ^old``; padding (``mask == 0``) contributes 0 to the sum and
    counts in the mean, as with verl's zero log-probs at padding.
    """
    a, b = _proxy_terms(mtp_logp, logp, old_logp, mask)
    return projection_coefficient(a, b, mask, scale, "reference")


def masked_coefficient(
    mtp_logp: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor, scale: float
) -> Tensor:
    """``c · Σ_M (a·b/(a²+1e-8)) / Σ M``: the reference formula averaged over response tokens."""
    a, b = _proxy_terms(mtp_logp, logp, old_logp, mask)
    return projection_coefficient(a, b, mask, scale, "masked")


def pooled_coefficient(
    mtp_logp: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor, scale: float
) -> Tensor:
    """``c · Σ_M a·b / Σ_M a²``: the least-squares slope of ``b`` on ``a``."""
    a, b = _proxy_terms(mtp_logp, logp, old_logp, mask)
    return projection_coefficient(a, b, mask, scale, "pooled")


def proxy_coefficients(
    mtp_logp: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor, scale: float
) -> dict[str, float]:
    """Every proxy estimator on the same tensors (validated and reduced once), as floats."""
    a, b = _proxy_terms(mtp_logp, logp, old_logp, mask)
    out = _reductions(a, b, check_mask(mask), check_number(scale, "scale"), REDUCTIONS)
    return {name: float(out[name]) for name in REDUCTIONS}


def jvp_coefficient(
    logprob_fn: Callable[[Params], Tensor],
    params: Params,
    unit_displacement: Params,
    update_rl: Params,
    mask: Tensor,
    scale: float,
    reduction: Reduction = "masked",
) -> Tensor:
    """The proxy formula with exact first-order changes (the ``jvp`` level).

    ``a_t = ∇ℓ_t · δ₁`` and ``b_t = ∇ℓ_t · u_RL`` by forward-mode ``jvp`` of the per-token main
    log-probs ``logprob_fn(params)`` (same shape as ``mask``), then
    :func:`projection_coefficient` with ``reduction``.
    """
    a = jvp_logprobs(logprob_fn, params, unit_displacement)
    b = jvp_logprobs(logprob_fn, params, update_rl)
    return projection_coefficient(a, b, mask, scale, reduction)


def trust_region_coefficient(a: Tensor, b: Tensor, advantages: Tensor, ratio: Tensor, mask: Tensor) -> float:
    """An estimate of ``λ*`` in the units of ``λ``, from the ``jvp`` level's per-token changes.

    Model the objective's change for a step ``x`` as ``⟨∇J, x⟩ − (β/2)·E_M[(∇ℓ·x)²]``: the first
    order exact, the second a Fisher (KL trust-region) penalty in the log-probs of the sampled
    tokens, whose scale ``β`` is calibrated so that the RL update itself is the best step along
    its own direction: ``β = C_RL / E_M[b²]`` with ``C_RL = ⟨∇J, u_RL⟩ = E_M[A·r·b]``. Adding
    ``λδ₁`` to ``u_RL`` then gains ``λC₁ − (β/2)(2λE_M[ab] + λ²E_M[a²])``, maximised at::

        λ_TR = (C₁ − β·E_M[a·b]) / (β·E_M[a²]),    C₁ = ⟨∇J, δ₁⟩ = E_M[A·r·a]

    with ``a = ∇ℓ·δ₁``, ``b = ∇ℓ·u_RL`` (``[B, T]``, from :func:`~decomp.curvature.jvp_logprobs`),
    the advantages ``A``, the importance ratio ``r = exp(ℓ − ℓ^old)`` and the mask. No Hessian.
    ``nan`` when the RL step does not improve ``J`` to first order (``C_RL ≤ 0``) or ``a = 0``.
    """
    check_same_shape(a=a, b=b, advantages=advantages, ratio=ratio, mask=mask)
    with torch.no_grad():
        m = check_mask(mask).to(torch.float64)
        a, b = a.detach().double() * m, b.detach().double() * m
        weight = advantages.detach().double() * ratio.detach().double() * m
        n = float(m.sum())
        if n == 0:
            return math.nan
        c1, c_rl = float((weight * a).sum()) / n, float((weight * b).sum()) / n
        aa, ab, bb = float((a * a).sum()) / n, float((a * b).sum()) / n, float((b * b).sum()) / n
    if c_rl <= 0 or aa == 0 or bb == 0:
        return math.nan
    beta = c_rl / bb
    return (c1 - beta * ab) / (beta * aa)


def model_gain(coef: float, dec: Decomposition) -> float:
    """Quadratic model of the MTP effect at coefficient ``λ = coef``: ``λ(C₁ + X₁) − λ²P₁``."""
    return dec.model_gain(check_number(coef, "coef"))


def model_efficiency(coef: float, dec: Decomposition) -> float:
    """``model_gain(λ)/model_gain(λ*)``: the quadratic model's view of how good ``λ`` is
    (1 optimal, ≤ 0 the estimate hurts). ``nan`` when ``λ*`` is undefined (``P₁ ≤ 0``), the
    best gain is 0, or ``coef`` is ``nan``. The realized version is :func:`efficiency`."""
    coef = float(coef)
    if math.isnan(coef):
        return math.nan
    best = model_gain(dec.lambda_star, dec) if math.isfinite(dec.lambda_star) else math.nan
    if not math.isfinite(best) or best == 0.0:
        return math.nan
    return model_gain(coef, dec) / best


def efficiency(gain: float, dec: Decomposition) -> float:
    """Realized efficiency ``ΔJ(λ_est)/ΔJ(λ̂)`` of an estimate whose realized gain (a real
    counterfactual step, :class:`~decomp.realized.RealizedGain`) is ``gain``: 1 is as good
    as the realized optimum, ≤ 0 means the estimate hurt. ``nan`` when ``λ̂`` was not searched,
    is undefined, or gains nothing (``ΔJ(λ̂) = 0``)."""
    best = dec.gain_hat
    if not (math.isfinite(best) and best > 0 and math.isfinite(gain)):
        return math.nan
    return gain / best
