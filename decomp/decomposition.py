"""The exact per-step decomposition of the MTP loss's effect on the RL objective (docs/method.md §3).

At parameters ``θ`` with optimizer state ``S``:

- ``g = ∇J(θ)``, ``H = ∇²J(θ)`` (only through Hessian-vector products);
- ``u_RL``: the optimizer's update for the loss gradient ``−∇J``; ``u``: its update for
  ``−∇J + λ∇L_MTP``; ``δ = u − u_RL`` the MTP displacement, ``δ₁`` its per-unit-coefficient
  version (see :mod:`decomp.optim`);
- correlation ``C = ⟨g, δ⟩``, cross term ``X = u_RLᵀHδ``, penalty ``P = −½ δᵀHδ``;
- predicted ``ΔJ_pred = C + X − P``; realized ``ΔJ_MTP = J(θ + u_RL + δ) − J(θ + u_RL)``;
  residual ``= realized − predicted = O(‖u‖³)``;
- ``λ* = (C₁ + X₁)/(2P₁)`` and ``λ*_nocross = C₁/(2P₁)`` from the unit quantities when
  ``P₁ > 0``, else ``nan`` with a reason;
- with ``search=True``, the realized optimum ``λ̂ = argmax_λ ΔJ(λ)``, ``ΔJ(λ) = J(θ + u(λ)) −
  J(θ + u_RL)`` with real counterfactual optimizer steps (:mod:`decomp.search`).

Two batches. The updates are built from the training batch (``mtp_loss``, and ``rl_loss`` or
``rl_objective``); ``J``'s side — ``g``, ``H``, the realized values and the search — is evaluated
on ``eval_objective`` when given (an independent held-out batch: an unbiased estimate of the
objective the update improves), else on ``rl_objective`` (in-sample). :func:`step_updates` and
:func:`decompose_updates` split the two, so that several evaluation objectives share one set of
updates.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Required, TypedDict, Unpack

import torch
from torch import Tensor

from decomp import optim as cf_optim
from decomp.checks import Params, check_number, check_params, scalar_function
from decomp.curvature import (
    DEFAULT_HVP_METHOD,
    HVPMethod,
    any_attention,
    dot,
    dots,
    math_attention,
    norm,
    second_order,
)
from decomp.search import (
    DEFAULT_SEARCH_BOUND,
    MAX_SEARCH_EVALUATIONS,
    SEARCH_RTOL,
    check_search,
    realized_optimum,
)

OptimizerSpec = str | torch.optim.Optimizer | cf_optim.SGD | cf_optim.AdamW
OPTIMIZER_NAMES = ("sgd", "adamw", "adam")


@dataclass(frozen=True)
class Decomposition:
    """All quantities of one instrumented step; every field is defined in docs/method.md §3.

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
    # the realized optimum (``search=True``; else nan and "not searched")
    lambda_hat: float = math.nan  # argmax_λ ΔJ(λ) with real optimizer steps
    gain_hat: float = math.nan  # ΔJ(λ̂) ≥ 0
    lambda_hat_reason: str = "not searched"  # "" when λ̂ is an interior maximum
    search_evaluations: int = 0  # forward evaluations of J the search took
    gain_lambda_star: float = math.nan  # ΔJ(λ*), realized: how good the quadratic model's optimum is

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
class StepUpdates:
    """The training batch's side of a step, shared by every evaluation objective.

    ``updates`` holds ``u_RL``, ``δ`` and ``δ₁`` (e.g. for the ``jvp`` estimators of
    :mod:`decomp.occ`); ``grad_mtp`` is ``∇L_MTP``, ``update_grad`` the loss gradient the
    optimizer stepped on for ``u_RL`` (``−∇J`` of the training batch, or ``∇rl_loss``).
    """

    theta: Params  # detached parameters
    updates: cf_optim.Counterfactual | None  # None until completed by the in-sample J's gradient
    grad_mtp: Params
    update_grad: Params | None
    mtp_value: float
    grad_norm_mtp: float
    coef: float
    optimizer: cf_optim.SGD | cf_optim.AdamW  # the resolved counterfactual optimizer
    devices: list[int]  # CUDA devices whose RNG a measurement forks

    def completed(self, grad_j: Params) -> StepUpdates:
        """The updates for ``u_RL`` following ``−∇J`` (in-sample ``J`` and no ``rl_loss``), from
        ``J``'s own gradient, so that it is computed once."""
        update_grad = {k: -v for k, v in grad_j.items()}
        cf = self.optimizer.counterfactual(self.theta, update_grad, self.grad_mtp, self.coef)
        return dataclasses.replace(self, updates=cf, update_grad=update_grad)

    def displacement(self, coef: float) -> Params:
        """``δ(λ)`` of a real counterfactual step at ``λ = coef``."""
        if coef == self.coef:
            return self.updates.displacement
        return self.optimizer.displacement(self.theta, self.update_grad, self.grad_mtp, coef, self.updates.update_rl)


@dataclass(frozen=True)
class StepMeasurement:
    """A :class:`Decomposition` with the updates and gradients it was computed from.

    ``grad_rl`` is ``∇J`` of the evaluation objective (``None`` once dropped,
    :meth:`without_buffers`); ``gain(λ)`` the realized ``J(θ + u_RL + δ(λ)) − J(θ + u_RL)`` of a
    real counterfactual step at any ``λ``.
    """

    decomposition: Decomposition
    step: StepUpdates
    grad_rl: Params | None
    gain: RealizedGain

    @property
    def updates(self) -> cf_optim.Counterfactual:
        return self.step.updates

    def without_buffers(self) -> StepMeasurement:
        """This measurement without the parameter-sized buffers of ``J``'s side: ``∇J``
        (``grad_rl`` becomes ``None``) and the realized gain's evaluation buffer (allocated again
        if the gain is evaluated again). The decomposition, the updates and the gain function stay."""
        self.gain.release()
        return dataclasses.replace(self, grad_rl=None)

    def searched(self, bound: float = DEFAULT_SEARCH_BOUND, evaluations: int = MAX_SEARCH_EVALUATIONS,
                 rtol: float = SEARCH_RTOL) -> StepMeasurement:
        """This measurement with the realized optimum ``λ̂ = argmax_λ gain(λ)`` over ``|λ| ≤ bound``
        (:func:`decomp.search.realized_optimum`, from ``λ*``) and ``ΔJ(λ*)``: forward passes only."""
        return dataclasses.replace(self, decomposition=_with_optimum(self.decomposition, self.gain, bound,
                                                                     evaluations, rtol))

    @property
    def grad_mtp(self) -> Params:
        return self.step.grad_mtp

    @property
    def update_grad(self) -> Params:
        return self.step.update_grad

    @property
    def optimizer(self) -> cf_optim.SGD | cf_optim.AdamW:
        return self.step.optimizer


class RealizedGain:
    """``ΔJ(λ) = J(θ + u_RL + δ(λ)) − J(θ + u_RL)`` with real counterfactual steps (no gradient).

    For an :class:`~decomp.objectives.ImportanceObjective` the difference is formed token by
    token in float64 from the per-token log-probs at both points (``Σ M·A·r₀·expm1(ℓ − ℓ₀)/Σ M``),
    so it is not limited by the rounding of two nearly equal sums ``J`` (at a real LM's learning
    rate, ΔJ_MTP sits at float32's resolution of ``J``); any other callable gives ``J − J``.
    ``dtype`` (e.g. float64 for a float32 model) evaluates ``J`` at points summed in that dtype.
    ``evaluations`` counts the forward evaluations (the one at ``θ + u_RL`` included).

    Every point is summed into one reused buffer, ``(θ + u_RL) + δ`` in that order (so without
    ``dtype`` the point is bit-identical to the real step's ``θ + u``): no copy of ``θ + u_RL``
    is kept, and in float64 the buffer is the only parameter-sized tensor the evaluations hold.
    """

    def __init__(self, objective: Callable[[Params], Tensor], step: StepUpdates, dtype: torch.dtype | None = None) -> None:
        self.objective, self.step, self.dtype = objective, step, dtype
        self.paired = callable(getattr(objective, "difference", None))
        self._keys = list(step.theta)
        self._work: list[Tensor] | None = None  # one buffer reused for every point
        self.evaluations = 0
        self._base = self._forward(self._point(step.updates.update_rl, None))

    def _point(self, update: Params | None, delta: Params | None) -> Params:
        """``(θ + update) + delta`` in the buffer (``None``: left out), in ``dtype`` when given:
        one multi-tensor pass per term (at small sizes, launches are the cost)."""
        theta = [self.step.theta[k] for k in self._keys]
        with torch.no_grad():
            if self._work is None:
                self._work = [t.to(self.dtype, copy=True) if self.dtype is not None and t.is_floating_point()
                              else t.clone() for t in theta]
            else:
                torch._foreach_copy_(self._work, theta)
            for term in (update, delta):
                if term is not None:
                    torch._foreach_add_(self._work, [term[k] for k in self._keys])
        return dict(zip(self._keys, self._work, strict=True))

    def _forward(self, point: Params) -> Tensor | float:
        """The per-token log-probs at ``point`` (paired), else ``J(point)``."""
        # forward only, so the fused attention kernel (faster than the math backend the
        # second-order passes need) — for every evaluation, wherever it is called from: the two
        # kernels differ in the last bit, and ΔJ is a difference
        with torch.random.fork_rng(devices=self.step.devices), any_attention(), torch.no_grad():
            self.evaluations += 1
            return self.objective.logprobs(point) if self.paired else float(self.objective(point))

    def change(self, point: Params) -> float:
        """``J(point) − J(θ + u_RL)``."""
        value = self._forward(point)
        if self.paired:
            return self.objective.difference(value, self._base)
        return value - self._base

    def rl_step(self) -> float:
        """``J(θ + u_RL) − J(θ)``: what the RL step alone gains (one evaluation at ``θ``)."""
        return -self.change(self._point(None, None))

    def at(self, delta: Params) -> float:
        """``ΔJ`` at the displacement ``delta``."""
        return self.change(self._point(self.step.updates.update_rl, delta))

    def __call__(self, coef: float) -> float:
        return 0.0 if coef == 0.0 else self.at(self.step.displacement(coef))

    def release(self) -> None:
        """Free the evaluation buffer (parameter-sized; in float64, twice the model's size) until
        the next evaluation allocates it again."""
        self._work = None


class MeasureOptions(TypedDict, total=False):
    """The keyword arguments :func:`decompose` and :func:`decompose_sweep` pass to
    :func:`measure_step` (documented there)."""

    coef: Required[float]
    lr: float | None
    optimizer: OptimizerSpec
    optimizer_state: cf_optim.State | None
    hvp_method: HVPMethod
    rl_loss: Callable[[Params], Tensor] | None
    first_order: Callable[[Params], tuple[Tensor, Tensor]] | None
    eval_objective: Callable[[Params], Tensor] | None
    realized_dtype: torch.dtype | None
    search: bool
    search_bound: float
    search_evaluations: int
    search_rtol: float
    microbatches: int


def step_updates(
    rl_objective: Callable[[Params], Tensor],
    mtp_loss: Callable[[Params], Tensor],
    params: Params,
    *,
    coef: float,
    lr: float | None = None,
    optimizer: OptimizerSpec = "sgd",
    optimizer_state: cf_optim.State | None = None,
    rl_loss: Callable[[Params], Tensor] | None = None,
    defer: bool = False,
    first_order: Callable[[Params], tuple[Tensor, Tensor]] | None = None,
) -> StepUpdates:
    """The training batch's side of :func:`measure_step`: ``∇L_MTP``, the loss gradient of the
    RL update (``∇rl_loss``, or ``−∇J`` of ``rl_objective``), and the counterfactual ``u_RL``,
    ``δ(coef)`` and ``δ₁`` (first-order passes only).

    ``defer`` (only without ``rl_loss``) leaves ``−∇J`` and the updates to
    :func:`decompose_updates` on the same ``rl_objective``, whose second-order pass gives ``∇J``.
    ``first_order(params) -> (L_MTP, rl_loss)``, the same two losses from one forward pass (e.g.
    :attr:`decomp.objectives.Objectives.first_order`), gives both gradients from that one pass.
    """
    params = check_params(params)
    coef = check_number(coef, "coef")
    if lr is not None:
        lr = check_number(lr, "lr", nonnegative=True)
    opt = _resolve_optimizer(optimizer, optimizer_state, lr, params)
    devices = sorted({p.device.index or 0 for p in params.values() if p.device.type == "cuda"})
    # first-order gradients only: the fused attention kernel (the training update's own) has a
    # backward, and on the built-in model the math backend cost this pass 15% more
    with torch.random.fork_rng(devices=devices), any_attention():
        theta = {k: v.detach() for k, v in params.items()}
        if first_order is not None and rl_loss is not None:
            g_mtp, mtp_value, update_grad = shared_first_order(first_order, theta)
        else:
            g_mtp, mtp_value = torch.func.grad_and_value(scalar_function(mtp_loss, "mtp_loss"))(theta)
            update_grad = None if rl_loss is None else torch.func.grad(scalar_function(rl_loss, "rl_loss"))(theta)
        if not math.isfinite(float(mtp_value)):
            raise ValueError(f"mtp_loss returned a non-finite value ({float(mtp_value)})")
        gn_mtp = _finite_norm(g_mtp, "the gradient of mtp_loss")
        step = StepUpdates(theta, None, g_mtp, None, float(mtp_value), gn_mtp, coef, opt, devices)
        if update_grad is not None:
            _finite_norm(update_grad, "the gradient of rl_loss")
            cf = opt.counterfactual(theta, update_grad, g_mtp, coef)
            return dataclasses.replace(step, updates=cf, update_grad=update_grad)
        if defer:
            return step
        with math_attention():  # J's gradient as its second-order pass computes it: the same bits
            grad_j = torch.func.grad(scalar_function(rl_objective, "rl_objective"))(theta)
        _finite_norm(grad_j, "the gradient of rl_objective")
        return step.completed(grad_j)


def shared_first_order(first_order: Callable[[Params], tuple[Tensor, Tensor]], theta: Params
                        ) -> tuple[Params, Tensor, Params]:
    """``∇L_MTP``, ``L_MTP`` and ``∇rl_loss`` from one forward (two backward passes through its
    graph) on leaf copies of ``θ``; parameters a loss does not use get zeros."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    tensors = list(leaves.values())
    with torch.enable_grad():
        mtp_value, rl_value = first_order(leaves)
        for name, value in (("mtp_loss", mtp_value), ("rl_loss", rl_value)):
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(f"first_order must return two scalars; its {name} is not one")
        g_mtp = torch.autograd.grad(mtp_value, tensors, retain_graph=True, allow_unused=True)
        g_rl = torch.autograd.grad(rl_value, tensors, allow_unused=True)

    def as_dict(grads: tuple) -> Params:
        return {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(leaves.items(), grads, strict=True)}

    return as_dict(g_mtp), mtp_value.detach().reshape(()), as_dict(g_rl)


def _quadratic_forms(rl: Any, step: StepUpdates) -> list[float]:
    """``[u_RL·Hδ₁, δ₁·Hδ₁, u_RL·Hδ, δ·Hδ]`` from the HVPs of ``rl`` (the last two only when the
    optimizer is nonlinear); each product is freed before the next."""
    u_rl, updates = step.updates.update_rl, step.updates
    forms = []
    for v in (updates.unit_displacement,) if step.optimizer.linear else (updates.unit_displacement,
                                                                          updates.displacement):
        h_v = rl.hvp(v)
        forms += dots([(u_rl, h_v), (v, h_v)])
        del h_v
    return forms


def _terms(g: Params, forms: list[float], step: StepUpdates) -> tuple[float, ...]:
    """``C₁, X₁, P₁, C, X, P`` from ``∇J`` and :func:`_quadratic_forms` (for a linear optimizer
    ``δ = λδ₁``, so ``C``, ``X``, ``P`` follow from the unit terms)."""
    delta, delta1 = step.updates.displacement, step.updates.unit_displacement
    x1, p1 = forms[0], -0.5 * forms[1] + 0.0  # + 0.0: report 0, not -0
    if step.optimizer.linear:
        lam, c1 = step.coef, dot(g, delta1)
        return c1, x1, p1, lam * c1, lam * x1, lam * lam * p1 + 0.0
    c1, c = dots([(g, delta1), (g, delta)])
    return c1, x1, p1, c, forms[2], -0.5 * forms[3] + 0.0


@dataclass
class EvaluationSide:
    """``J``'s side of one evaluation objective at ``θ``, shareable by every direction measured at
    one update (they share ``θ`` and ``u_RL``; only ``δ`` and ``δ₁`` differ): the second-order
    pass (value, gradient, HVP callable) and the realized change of the RL step alone.

    Holding it keeps ``J``'s second-order graph alive: memory traded for one pass per direction.
    """

    objective: Callable[[Params], Tensor]
    name: str
    rl: Any  # decomp.curvature.SecondOrder
    grad_norm: float
    realized_rl: float | None = None  # J(θ + u_RL) − J(θ), set by the first direction

    @classmethod
    def at(cls, objective: Callable[[Params], Tensor], theta: Params, devices: list[int], *,
           hvp_method: HVPMethod = DEFAULT_HVP_METHOD, name: str = "eval_objective") -> EvaluationSide:
        J = scalar_function(objective, name)
        with torch.random.fork_rng(devices=devices), math_attention():
            rl = second_order(J, theta, method=hvp_method, name=name)
        return cls(objective, name, rl, _checked_grad_norm(name, float(rl.value), rl.grad))


def _checked_grad_norm(name: str, value: float, grad: Params) -> float:
    """``‖∇J‖``, once ``J``'s value and gradient are checked finite."""
    if not math.isfinite(value):
        raise ValueError(f"{name} returned a non-finite value ({value})")
    return _finite_norm(grad, f"the gradient of {name}")


def decompose_updates(
    step: StepUpdates,
    objective: Callable[[Params], Tensor],
    *,
    hvp_method: HVPMethod = DEFAULT_HVP_METHOD,
    search: bool = False,
    search_bound: float = DEFAULT_SEARCH_BOUND,
    search_evaluations: int = MAX_SEARCH_EVALUATIONS,
    search_rtol: float = SEARCH_RTOL,
    name: str = "eval_objective",
    realized_dtype: torch.dtype | None = None,
    side: EvaluationSide | None = None,
    microbatches: int = 1,
) -> StepMeasurement:
    """``J``'s side of :func:`measure_step` on ``objective`` (called ``name`` in errors) for
    updates built elsewhere; ``realized_dtype`` evaluates the realized changes (and the search)
    in that dtype (:class:`RealizedGain`). ``side``: an :class:`EvaluationSide` of the same
    objective at the same ``θ`` shared with other directions (else one is built and freed).
    ``microbatches > 1``: ``J``'s gradient and both HVPs summed over that many row chunks
    (:func:`_microbatched_side`), for the memory of one chunk's second-order graph."""
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise ValueError(f"microbatches must be a positive integer, got {microbatches!r}")
    if microbatches > 1:
        if side is not None:
            raise ValueError("microbatches > 1 builds J's side chunk by chunk and cannot use a shared side")
        side, j_value, g, terms = _microbatched_side(objective, step, microbatches, hvp_method, name)
    else:
        step, side, j_value, g, terms = _whole_side(objective, step, side, hvp_method, name)
    with torch.random.fork_rng(devices=step.devices), math_attention():
        gain = RealizedGain(objective, step, realized_dtype)
        realized = gain.at(step.updates.displacement)
        if side.realized_rl is None:  # J(θ + u_RL) − J(θ), as every realized value: once per side
            side.realized_rl = gain.rl_step()
    measured = StepMeasurement(_decomposition(step, side, g, j_value, terms, realized, hvp_method),
                               step, g, gain)
    return measured.searched(search_bound, search_evaluations, search_rtol) if search else measured


def _whole_side(objective: Callable[[Params], Tensor], step: StepUpdates, side: EvaluationSide | None,
                hvp_method: HVPMethod, name: str) -> tuple[StepUpdates, EvaluationSide, float, Params, tuple[float, ...]]:
    """``J``'s value, gradient and the six terms from one second-order pass over the whole batch
    (``side``'s, else one built here and freed before the realized evaluations)."""
    own = side is None
    if own:
        side = EvaluationSide.at(objective, step.theta, step.devices, hvp_method=hvp_method, name=name)
    rl = side.rl
    with torch.random.fork_rng(devices=step.devices), math_attention():
        if step.updates is None:
            step = step.completed(rl.grad)
        terms = _terms(rl.grad, _quadratic_forms(rl, step), step)
    if own:
        side.rl = None  # frees J's second-order graph
    return step, side, float(rl.value), rl.grad, terms


def _microbatched_side(objective: Callable[[Params], Tensor], step: StepUpdates, parts: int, hvp_method: HVPMethod,
                       name: str) -> tuple[EvaluationSide, float, Params, tuple[float, ...]]:
    """``J``'s value, gradient and the six terms summed over row chunks ``J = Σ_c J_c``
    (``objective.split(parts)``): ``∇J = Σ_c ∇J_c`` and ``vᵀHw = Σ_c vᵀH_c w`` exactly, with
    one chunk's second-order graph alive at a time (its memory ÷ ``parts``; more passes, each
    smaller). ``C₁ = ⟨∇J, δ₁⟩`` and ``C`` are formed once the gradient is summed."""
    if step.updates is None:
        raise ValueError("microbatches > 1 needs the updates before J's side: give rl_loss, or an eval_objective")
    if not callable(getattr(objective, "split", None)):
        raise ValueError(f"microbatches > 1 needs an objective with split() (decomp.objectives.ImportanceObjective); "
                         f"{name} has none")
    value, g, forms = 0.0, None, None
    with torch.random.fork_rng(devices=step.devices), math_attention():
        for part in objective.split(parts):
            rl = second_order(part, step.theta, method=hvp_method, name=name)
            value += float(rl.value)
            if g is None:
                g, forms = rl.grad, _quadratic_forms(rl, step)
            else:
                torch._foreach_add_(list(g.values()), [rl.grad[k] for k in g])
                forms = [a + b for a, b in zip(forms, _quadratic_forms(rl, step), strict=True)]
            del rl
    side = EvaluationSide(objective, name, None, _checked_grad_norm(name, value, g))
    return side, value, g, _terms(g, forms, step)


def _decomposition(step: StepUpdates, side: EvaluationSide, g: Params, j_value: float, terms: tuple[float, ...],
                   realized: float, hvp_method: str) -> Decomposition:
    c1, x1, p1, c, x, p = terms
    lam, lam_nc, reason = optimal_coefficient(c1, x1, p1)
    gn_rl, gn_mtp = side.grad_norm, step.grad_norm_mtp
    u_rl, delta = step.updates.update_rl, step.updates.displacement
    g_dot_mtp, uu, dd = dots([(g, step.grad_mtp), (u_rl, u_rl), (delta, delta)])
    cosine = -g_dot_mtp / (gn_rl * gn_mtp) + 0.0 if gn_rl > 0 and gn_mtp > 0 else math.nan
    return Decomposition(
        correlation=c, cross=x, penalty=p, predicted=c + x - p, realized=realized, residual=realized - (c + x - p),
        lambda_star=lam, lambda_star_no_cross=lam_nc, lambda_star_reason=reason, correlation_unit=c1,
        cross_unit=x1, penalty_unit=p1, grad_norm_rl=gn_rl, grad_norm_mtp=gn_mtp, cosine=cosine,
        update_norm_rl=uu**0.5, displacement_norm=dd**0.5,
        rl_objective=j_value, mtp_loss=step.mtp_value, realized_rl=side.realized_rl, coef=step.coef,
        optimizer=step.optimizer.name, hvp_method=hvp_method,
    )


def _with_optimum(dec: Decomposition, gain: RealizedGain, bound: float, evaluations: int, rtol: float) -> Decomposition:
    """``dec`` with the realized optimum (:func:`decomp.search.realized_optimum`) and ``ΔJ(λ*)``."""
    start = dec.lambda_star if math.isfinite(dec.lambda_star) and dec.lambda_star != 0 else dec.coef
    opt = realized_optimum(gain, start=start, bound=bound, max_evaluations=evaluations, rtol=rtol,
                           moves_objective=dec.moves_objective or dec.realized != 0)
    at_star = gain(dec.lambda_star) if math.isfinite(dec.lambda_star) else math.nan
    return dataclasses.replace(
        dec, lambda_hat=opt.coef, gain_hat=opt.gain, lambda_hat_reason=opt.reason,
        search_evaluations=opt.evaluations, gain_lambda_star=at_star,
    )


def measure_step(
    rl_objective: Callable[[Params], Tensor],
    mtp_loss: Callable[[Params], Tensor],
    params: Params,
    *,
    coef: float,
    lr: float | None = None,
    optimizer: OptimizerSpec = "sgd",
    optimizer_state: cf_optim.State | None = None,
    hvp_method: HVPMethod = DEFAULT_HVP_METHOD,
    rl_loss: Callable[[Params], Tensor] | None = None,
    first_order: Callable[[Params], tuple[Tensor, Tensor]] | None = None,
    eval_objective: Callable[[Params], Tensor] | None = None,
    realized_dtype: torch.dtype | None = None,
    search: bool = False,
    search_bound: float = DEFAULT_SEARCH_BOUND,
    search_evaluations: int = MAX_SEARCH_EVALUATIONS,
    search_rtol: float = SEARCH_RTOL,
    microbatches: int = 1,
) -> StepMeasurement:  # long only by its docstring: every option of decompose is documented here
    """Decompose the effect of one MTP-augmented optimizer step on ``J`` (docs/method.md §3).

    Args:
        rl_objective: ``J(params)`` on the training batch, to **maximise** (scalar).
        mtp_loss: ``L_MTP(params)``, the MTP loss to **minimise** (scalar). Its gradient on the
            shared parameters decides the regime: a loss computed through detached copies
            (``detach``) gives ``δ = 0`` there and so exactly zero correlation and penalty.
        params: ``dict[str, Tensor]`` of parameters (e.g. ``dict(model.named_parameters())``).
        coef: the MTP coefficient ``λ`` of the joint loss ``−J + λ·L_MTP``.
        lr: learning rate ``η``. Required for an optimizer given by name; for an optimizer
            object, overrides its learning rate(s) when given.
        optimizer: ``"sgd"`` (plain gradient step), ``"adamw"``/``"adam"`` with
            ``optimizer_state``, a live ``torch.optim`` SGD/Adam/AdamW (its hyperparameters and
            state are read, never modified), or a :mod:`decomp.optim` counterfactual optimizer.
        optimizer_state: per-parameter state for ``"adamw"``/``"adam"``
            (``{name: {"step", "exp_avg", "exp_avg_sq"}}``); ``None`` is a fresh state.
        hvp_method: ``"autograd"`` (double backward, default), ``"reverse"`` (``vjp∘grad``) or
            ``"forward"`` (``jvp∘grad``), see :mod:`decomp.curvature`.
        rl_loss: the loss whose gradient drives the RL update, when training does not step on
            ``−J`` itself (e.g. the clipped surrogate plus a KL term). Default: ``−J``.
        first_order: optional ``params -> (L_MTP, rl_loss)`` computing both losses from one
            forward pass (:attr:`decomp.objectives.Objectives.first_order`): the two first-order
            gradients then share it. Only used with ``rl_loss``.
        eval_objective: the ``J`` the step is judged on (``g``, ``H``, realized values, search),
            e.g. the same objective on an independent held-out batch. Default: ``rl_objective``
            (in-sample).
        realized_dtype: evaluate the realized changes and the search in this dtype (e.g.
            ``torch.float64`` for a float32 model at a small learning rate, where the forward's
            rounding is the size of ΔJ_MTP). Default: the parameters' dtype.
        search: also find the realized optimum ``λ̂`` (:func:`decomp.search.realized_optimum`),
            its gain and the realized gain at ``λ*``.
        search_bound: the largest ``|λ|`` the search tries (finite, positive).
        search_evaluations: at most this many forward evaluations of ``J`` for the search.
        search_rtol: the search stops when ``λ̂`` is known to this relative accuracy.
        microbatches: build ``J``'s side (gradient and both HVPs) over this many row chunks of
            the evaluation batch, one chunk's second-order graph alive at a time: its memory ÷
            ``microbatches``, the same numbers up to float rounding. Needs an objective with
            ``split`` (:class:`decomp.objectives.ImportanceObjective`) and the updates built
            before ``J``'s side (``rl_loss`` or ``eval_objective`` given).

    Returns:
        A :class:`StepMeasurement` (the :class:`Decomposition`, the updates, ``∇J`` and the
        realized-gain function). Parameters, optimizer state and the torch RNG state are left
        bit-identical (the RNG is forked, so even a stochastic objective cannot advance it).
    """
    if search:
        check_search(optimizer, search_bound, search_evaluations, search_rtol)
    step = step_updates(rl_objective, mtp_loss, params, coef=coef, lr=lr, optimizer=optimizer,
                        optimizer_state=optimizer_state, rl_loss=rl_loss,
                        defer=rl_loss is None and eval_objective is None, first_order=first_order)
    return decompose_updates(step, rl_objective if eval_objective is None else eval_objective,
                             hvp_method=hvp_method, search=search, search_bound=search_bound,
                             search_evaluations=search_evaluations, search_rtol=search_rtol,
                             name="rl_objective" if eval_objective is None else "eval_objective",
                             realized_dtype=realized_dtype, microbatches=microbatches)


def decompose(
    rl_objective: Callable[[Params], Tensor],
    mtp_loss: Callable[[Params], Tensor],
    params: Params,
    **options: Unpack[MeasureOptions],
) -> Decomposition:
    """The :class:`Decomposition` of :func:`measure_step` (same arguments; see there)."""
    return measure_step(rl_objective, mtp_loss, params, **options).decomposition


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
    (each coefficient costs one counterfactual step and one evaluation of ``J``)."""
    coefs = [check_number(c, "coefs[i]") for c in coefs]
    if not coefs:
        raise ValueError("coefs is empty")
    dec = measured.decomposition
    realized = [measured.gain(lam) for lam in coefs]
    quadratic = [lam * (dec.correlation_unit + dec.cross_unit) - lam * lam * dec.penalty_unit for lam in coefs]
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
