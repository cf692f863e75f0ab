"""Coefficient sweeps: the realized effect of real counterfactual steps over a grid of ``λ``,
beside the quadratic model (docs/method.md §3.7)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Unpack

from torch import Tensor

from decomp.checks import Params, check_number
from decomp.decomposition import Decomposition, MeasureOptions, StepMeasurement, measure_step


@dataclass(frozen=True)
class Sweep:
    """Realized MTP effects of real counterfactual steps over a grid of coefficients.

    ``realized[i] = J(θ + u(λ_i)) − J(θ + u_RL)`` with ``u(λ)`` the optimizer's own update for
    ``−∇J + λ_i ∇L_MTP``; ``quadratic[i] = λ_i (C₁ + X₁) − λ_i² P₁`` is the second-order model of
    the same quantity. With SGD and a quadratic ``J`` the two agree exactly; elsewhere their gap
    shows where the model (and so ``λ*``) stops describing the real step.
    """

    coefs: list[float]
    realized: list[float]
    quadratic: list[float]
    decomposition: Decomposition  # at the base coefficient ``coef``


def sweep_coefficients(measured: StepMeasurement, coefs: list[float]) -> Sweep:
    """The realized effect of real counterfactual steps at ``coefs``, reusing a measurement
    (each coefficient costs one counterfactual step and one evaluation of ``J``, in batched
    forwards: :meth:`StepMeasurement.gains`)."""
    coefs = [check_number(c, "coefs[i]") for c in coefs]
    if not coefs:
        raise ValueError("coefs is empty")
    dec = measured.decomposition
    realized = measured.gains(coefs)
    quadratic = [dec.model_gain(lam) for lam in coefs]
    return Sweep(coefs, realized, quadratic, dec)


def decompose_sweep(
    rl_objective: Callable[[Params], Tensor],
    mtp_loss: Callable[[Params], Tensor],
    params: Params,
    *,
    coefs: list[float],
    **options: Unpack[MeasureOptions],
) -> Sweep:
    """:func:`decompose` at ``coef``, plus the realized effect of real steps at every ``coefs``.

    Leaves parameters, optimizer state and the RNG untouched, as :func:`decompose` does.
    """
    return sweep_coefficients(measure_step(rl_objective, mtp_loss, params, **options), coefs)
