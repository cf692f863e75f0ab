"""The exact per-step decomposition of the MTP loss's effect on the RL objective (DESIGN.md §3).

At parameters ``θ`` with optimizer state ``S``:

- ``g = ∇J(θ)``, ``H = ∇²J(θ)`` (only through Hessian-vector products);
- ``u_RL``: the optimizer's update for the loss gradient ``−∇J``; ``u``: its update for
  ``−∇J + λ∇L_MTP``; ``δ = u − u_RL`` the MTP displacement, ``δ₁`` its per-unit-coefficient
  version (see :mod:`decomp.optim`);
- correlation ``C = ⟨g, δ⟩``, cross term ``X = u_RLᵀHδ``, penalty ``P = −½ δᵀHδ``;
- predicted ``ΔJ_pred = C + X − P``; realized ``ΔJ_MTP = J(θ + u_RL + δ) − J(θ + u_RL)``;
  residual ``= realized − predicted = O(‖u‖³)``;
- ``λ* = (C₁ + X₁)/(2P₁)`` and ``λ*_nocross = C₁/(2P₁)`` from the unit quantities when
  ``P₁ > 0``, else ``nan`` with a reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from decomp import optim as cf_optim
from decomp.checks import Params, check_number, check_params, scalar_function
from decomp.curvature import (
    DEFAULT_HVP_METHOD,
    HVPMethod,
    dot,
    math_attention,
    norm,
    second_order,
)

OptimizerSpec = str | torch.optim.Optimizer | cf_optim.SGD | cf_optim.AdamW
OPTIMIZER_NAMES = ("sgd", "adamw", "adam")


@dataclass(frozen=True)
class Decomposition:
    """All quantities of one instrumented step; every field is defined in DESIGN.md §3.

    Fields with ``_unit`` are per unit coefficient (``δ₁`` in place of ``δ``); for SGD
    ``correlation = coef·correlation_unit``, ``cross = coef·cross_unit`` and
    ``penalty = coef²·penalty_unit`` exactly.
    """

    correlation: float  # C = ⟨∇J, δ⟩
    cross: float  # X = u_RLᵀ H δ
    penalty: float  # P = −½ δᵀ H δ
    predicted: float  # C + X − P
    realized: float  # J(θ + u_RL + δ) − J(θ + u_RL)
    residual: float  # realized − predicted
    lambda_star: float  # (C₁ + X₁) / (2 P₁), nan when P₁ ≤ 0
    lambda_star_no_cross: float  # C₁ / (2 P₁), nan when P₁ ≤ 0
    lambda_star_reason: str  # "" when λ* is defined, else why it is nan
    correlation_unit: float  # C₁ = ⟨∇J, δ₁⟩
    cross_unit: float  # X₁ = u_RLᵀ H δ₁
    penalty_unit: float  # P₁ = −½ δ₁ᵀ H δ₁
    grad_norm_rl: float  # ‖∇J‖
    grad_norm_mtp: float  # ‖∇L_MTP‖ (all parameters)
    cosine: float  # ⟨∇J, −∇L_MTP⟩ / (‖∇J‖‖∇L_MTP‖), nan if either is 0
    update_norm_rl: float  # ‖u_RL‖
    displacement_norm: float  # ‖δ‖
    rl_objective: float  # J(θ)
    mtp_loss: float  # L_MTP(θ)
    realized_rl: float  # J(θ + u_RL) − J(θ): what the RL step alone gains
    coef: float  # λ the displacement δ was computed with
    optimizer: str  # "sgd" or "adamw"
    hvp_method: str  # "autograd", "reverse" or "forward"

    @property
    def moves_objective(self) -> bool:
        """False when the unit displacement leaves ``J`` unchanged to second order (``C₁ = X₁ =
        P₁ = 0``: e.g. a ``detach`` direction), where no coefficient can matter."""
        return not (self.correlation_unit == 0 and self.cross_unit == 0 and self.penalty_unit == 0)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a flat ``dict`` (floats and strings)."""
        return dataclasses.asdict(self)


def _resolve_optimizer(
    optimizer: OptimizerSpec,
    optimizer_state: cf_optim.State | None,
    lr: float | None,
    params: Params,
) -> cf_optim.SGD | cf_optim.AdamW:
    if isinstance(optimizer, str):
        name = optimizer.lower()
        if name not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer must be one of {OPTIMIZER_NAMES} or an optimizer object, got {optimizer!r}")
        if lr is None:
            raise ValueError("lr is required when optimizer is given by name")
        if name == "sgd":
            if optimizer_state:
                raise ValueError(
                    "optimizer='sgd' is plain gradient descent and takes no optimizer_state; "
                    "pass decomp.optim.SGD(...) or the torch optimizer for momentum"
                )
            return cf_optim.SGD(cf_optim.SGDHyper(lr=lr))
        if name == "adamw":
            return cf_optim.AdamW(cf_optim.AdamHyper(lr=lr), optimizer_state)
        return cf_optim.AdamW(
            cf_optim.AdamHyper(lr=lr, weight_decay=0.0, decoupled_weight_decay=False), optimizer_state
        )
    if optimizer_state is not None:
        raise ValueError("optimizer_state is only used with an optimizer given by name")
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = cf_optim.from_torch(optimizer, params)
    elif isinstance(optimizer, (cf_optim.SGD, cf_optim.AdamW)):
        opt = optimizer
    else:
        raise TypeError(
            "optimizer must be 'sgd', 'adamw', 'adam', a torch.optim optimizer or a "
            f"decomp.optim optimizer, got {type(optimizer).__name__}"
        )
    return opt.with_lr(lr) if lr is not None else opt


def _add(a: Params, b: Params) -> Params:
    return {k: a[k] + b[k] for k in a}


def _finite_norm(d: Params, what: str) -> float:
    """‖d‖ (float64 accumulation); a NaN or infinity anywhere makes it non-finite, so checking
    it replaces a separate pass over every tensor."""
    value = norm(d)
    if not math.isfinite(value):
        bad = next((k for k, t in d.items() if not bool(torch.isfinite(t).all())), "?")
        raise ValueError(f"{what} is not finite at parameter {bad!r}")
    return value


def optimal_coefficient(correlation_unit: float, cross_unit: float, penalty_unit: float) -> tuple[float, float, str]:
    """``(λ*, λ*_nocross, reason)`` from the unit quantities; ``nan`` with a reason if ``P₁ ≤ 0``."""
    if penalty_unit > 0:
        return (
            (correlation_unit + cross_unit) / (2 * penalty_unit),
            correlation_unit / (2 * penalty_unit),
            "",
        )
    if penalty_unit == 0 and correlation_unit == 0 and cross_unit == 0:
        reason = "the MTP displacement does not move J (correlation and penalty are zero)"
    else:
        reason = "penalty_unit <= 0: J is not concave along the MTP displacement, no interior maximum"
    return math.nan, math.nan, reason


@dataclass(frozen=True)
class StepMeasurement:
    """A :class:`Decomposition` with the update dicts it was computed from.

    ``updates`` holds ``u_RL``, ``δ`` and ``δ₁`` (e.g. for the ``jvp`` estimators of
    :mod:`decomp.occ`); ``grad_rl`` is ``∇J``, ``grad_mtp`` is ``∇L_MTP`` and ``update_grad`` the
    loss gradient the optimizer stepped on for ``u_RL`` (``−∇J``, or ``∇rl_loss``).
    """

    decomposition: Decomposition
    updates: cf_optim.Counterfactual
    grad_rl: Params
    grad_mtp: Params
    update_grad: Params
    optimizer: cf_optim.SGD | cf_optim.AdamW  # the resolved counterfactual optimizer


def decompose(
    rl_objective: Callable[[Params], Tensor],
    mtp_loss: Callable[[Params], Tensor],
    params: Params,
    *,
    lr: float | None = None,
    coef: float,
    optimizer: OptimizerSpec = "sgd",
    optimizer_state: cf_optim.State | None = None,
    hvp_method: HVPMethod = DEFAULT_HVP_METHOD,
    rl_loss: Callable[[Params], Tensor] | None = None,
) -> Decomposition:
    """Decompose the effect of one MTP-augmented optimizer step on ``J`` (DESIGN.md §3).

    Args:
        rl_objective: ``J(params)``, the RL objective to **maximise** (scalar).
        mtp_loss: ``L_MTP(params)``, the MTP loss to **minimise** (scalar). Its gradient on the
            shared parameters decides the regime: a loss computed through detached copies
            (``detach``) gives ``δ = 0`` there and so exactly zero correlation and penalty.
        params: ``dict[str, Tensor]`` of parameters (e.g. ``dict(model.named_parameters())``).
        lr: learning rate ``η``. Required for an optimizer given by name; for an optimizer
            object, overrides its learning rate(s) when given.
        coef: the MTP coefficient ``λ`` of the joint loss ``−J + λ·L_MTP``.
        optimizer: ``"sgd"`` (plain gradient step: ``u_RL = η∇J``, ``δ = −ηλ∇L_MTP``),
            ``"adamw"``/``"adam"`` with ``optimizer_state``, a live ``torch.optim`` SGD/Adam/AdamW
            (its hyperparameters and state are read, never modified), or a
            :mod:`decomp.optim` counterfactual optimizer.
        optimizer_state: per-parameter state for ``"adamw"``/``"adam"``
            (``{name: {"step", "exp_avg", "exp_avg_sq"}}``); ``None`` is a fresh state.
        hvp_method: ``"autograd"`` (double backward, default), ``"reverse"`` (``vjp∘grad``) or
            ``"forward"`` (``jvp∘grad``), see :mod:`decomp.curvature`.
        rl_loss: the loss whose gradient drives the RL update, when training does not step on
            ``−J`` itself (e.g. the clipped surrogate plus a KL term at a later mini-batch
            update). ``u_RL`` and ``u`` then follow ``∇rl_loss``; ``g``, ``H`` and the realized
            change stay those of ``J``. Default: ``−J``.

    Returns:
        A :class:`Decomposition`. Parameters, optimizer state and the torch RNG state are left
        bit-identical (the RNG is forked, so even a stochastic objective cannot advance it).
        :func:`measure_step` returns the same with the update dicts.
    """
    return measure_step(
        rl_objective,
        mtp_loss,
        params,
        lr=lr,
        coef=coef,
        optimizer=optimizer,
        optimizer_state=optimizer_state,
        hvp_method=hvp_method,
        rl_loss=rl_loss,
    ).decomposition


def measure_step(
    rl_objective: Callable[[Params], Tensor],
    mtp_loss: Callable[[Params], Tensor],
    params: Params,
    *,
    lr: float | None = None,
    coef: float,
    optimizer: OptimizerSpec = "sgd",
    optimizer_state: cf_optim.State | None = None,
    hvp_method: HVPMethod = DEFAULT_HVP_METHOD,
    rl_loss: Callable[[Params], Tensor] | None = None,
) -> StepMeasurement:
    """:func:`decompose`, also returning ``u_RL``, ``δ``, ``δ₁`` and both gradients."""
    params = check_params(params)
    coef = check_number(coef, "coef")
    if lr is not None:
        lr = check_number(lr, "lr", nonnegative=True)
    opt = _resolve_optimizer(optimizer, optimizer_state, lr, params)
    J = scalar_function(rl_objective, "rl_objective")
    L = scalar_function(mtp_loss, "mtp_loss")
    devices = sorted({p.device.index or 0 for p in params.values() if p.device.type == "cuda"})

    with torch.random.fork_rng(devices=devices), math_attention():
        theta = {k: v.detach() for k, v in params.items()}
        # the first-order gradients before J's second-order graph exists: their passes then
        # never hold memory at the same time as that graph (the peak of a decomposition)
        g_mtp, mtp_value = torch.func.grad_and_value(L)(theta)
        if not math.isfinite(float(mtp_value)):
            raise ValueError(f"mtp_loss returned a non-finite value ({float(mtp_value)})")
        gn_mtp = _finite_norm(g_mtp, "the gradient of mtp_loss")
        update_grad = None
        if rl_loss is not None:
            update_grad = torch.func.grad(scalar_function(rl_loss, "rl_loss"))(theta)
            _finite_norm(update_grad, "the gradient of rl_loss")
        rl = second_order(J, params, method=hvp_method, name="rl_objective")
        if not math.isfinite(float(rl.value)):
            raise ValueError(f"rl_objective returned a non-finite value ({float(rl.value)})")
        gn_rl = _finite_norm(rl.grad, "the gradient of rl_objective")

        g = rl.grad
        if update_grad is None:
            update_grad = {k: -v for k, v in g.items()}
        cf = opt.counterfactual(theta, update_grad, g_mtp, coef)
        u_rl, delta, delta1 = cf.update_rl, cf.displacement, cf.unit_displacement

        h_delta1 = rl.hvp(delta1)
        c1 = dot(g, delta1)
        x1 = dot(u_rl, h_delta1)
        p1 = -0.5 * dot(delta1, h_delta1) + 0.0  # + 0.0: report 0, not -0
        del h_delta1  # (one parameter-sized buffer fewer at the second HVP)
        if opt.linear:
            c, x, p = coef * c1, coef * x1, coef * coef * p1 + 0.0
        else:
            h_delta = rl.hvp(delta)
            c = dot(g, delta)
            x = dot(u_rl, h_delta)
            p = -0.5 * dot(delta, h_delta) + 0.0
            del h_delta
        j_value = float(rl.value)
        del rl  # frees J's second-order graph before the evaluations below

        with torch.no_grad():
            # one buffer for both points: θ + u_RL, then + δ in place
            point = _add(theta, u_rl)
            j_rl = float(J(point))
            for k in point:
                point[k].add_(delta[k])
            j_full = float(J(point))

    predicted = c + x - p
    realized = j_full - j_rl
    lam, lam_nc, reason = optimal_coefficient(c1, x1, p1)
    cosine = -dot(g, g_mtp) / (gn_rl * gn_mtp) + 0.0 if gn_rl > 0 and gn_mtp > 0 else math.nan
    dec = Decomposition(
        correlation=c,
        cross=x,
        penalty=p,
        predicted=predicted,
        realized=realized,
        residual=realized - predicted,
        lambda_star=lam,
        lambda_star_no_cross=lam_nc,
        lambda_star_reason=reason,
        correlation_unit=c1,
        cross_unit=x1,
        penalty_unit=p1,
        grad_norm_rl=gn_rl,
        grad_norm_mtp=gn_mtp,
        cosine=cosine,
        update_norm_rl=norm(u_rl),
        displacement_norm=norm(delta),
        rl_objective=j_value,
        mtp_loss=float(mtp_value),
        realized_rl=j_rl - j_value,
        coef=coef,
        optimizer=opt.name,
        hvp_method=hvp_method,
    )
    return StepMeasurement(dec, cf, g, g_mtp, update_grad, opt)


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


def sweep_coefficients(
    measured: StepMeasurement,
    rl_objective: Callable[[Params], Tensor],
    params: Params,
    coefs: list[float],
) -> Sweep:
    """The realized effect of real counterfactual steps at ``coefs``, reusing a measurement.

    ``measured`` comes from :func:`measure_step` at the same ``params`` (its gradients and
    resolved optimizer are reused, so each coefficient costs one counterfactual step and one
    evaluation of ``J``).
    """
    coefs = [check_number(c, "coefs[i]") for c in coefs]
    if not coefs:
        raise ValueError("coefs is empty")
    dec = measured.decomposition
    J = scalar_function(rl_objective, "rl_objective")
    theta = {k: v.detach() for k, v in params.items()}
    devices = sorted({p.device.index or 0 for p in params.values() if p.device.type == "cuda"})
    realized = []
    with torch.random.fork_rng(devices=devices), math_attention(), torch.no_grad():
        theta_rl = _add(theta, measured.updates.update_rl)
        j_rl = float(J(theta_rl))
        for lam in coefs:
            delta = measured.optimizer.counterfactual(theta, measured.update_grad, measured.grad_mtp, lam).displacement
            realized.append(float(J(_add(theta_rl, delta))) - j_rl)
    quadratic = [lam * (dec.correlation_unit + dec.cross_unit) - lam * lam * dec.penalty_unit for lam in coefs]
    return Sweep(coefs, realized, quadratic, dec)


def decompose_sweep(
    rl_objective: Callable[[Params], Tensor],
    mtp_loss: Callable[[Params], Tensor],
    params: Params,
    *,
    coefs: list[float],
    coef: float,
    lr: float | None = None,
    optimizer: OptimizerSpec = "sgd",
    optimizer_state: cf_optim.State | None = None,
    hvp_method: HVPMethod = DEFAULT_HVP_METHOD,
    rl_loss: Callable[[Params], Tensor] | None = None,
) -> Sweep:
    """:func:`decompose` at ``coef``, plus the realized effect of real steps at every ``coefs``.

    Leaves parameters, optimizer state and the RNG untouched, as :func:`decompose` does.
    """
    measured = measure_step(
        rl_objective, mtp_loss, params, lr=lr, coef=coef, optimizer=optimizer,
        optimizer_state=optimizer_state, hvp_method=hvp_method, rl_loss=rl_loss,
    )
    return sweep_coefficients(measured, rl_objective, params, coefs)
