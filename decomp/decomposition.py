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
updates. The training side lives in :mod:`decomp.updates`, ``J``'s second-order side and the
terms in :mod:`decomp.evaluation`, the realized change in :mod:`decomp.realized`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Required, TypedDict, Unpack

import torch
from torch import Tensor

from decomp import optim as cf_optim
from decomp.checks import Params
from decomp.curvature import DEFAULT_HVP_METHOD, HVPMethod, dots, math_attention
from decomp.evaluation import (
    EvaluationSide,
    Terms,
    forward_side,
    group_terms_of,
    grouped_side,
    microbatched_side,
    whole_side,
)
from decomp.realized import RealizedGain
from decomp.search import (
    DEFAULT_SEARCH_BOUND,
    MAX_SEARCH_EVALUATIONS,
    SEARCH_RTOL,
    check_search,
    realized_optimum,
)
from decomp.uncertainty import group_errors
from decomp.updates import OptimizerSpec, StepUpdates, step_updates


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
    cosine: float  # ⟨∇J, −∇L_MTP⟩ / (‖∇J‖‖∇L_MTP‖) over the shared parameters when given, nan if either is 0
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
    lambda_hat_reason: str = "not searched"  # "" when λ̂ is a resolved maximum
    search_evaluations: int = 0  # coefficients the search evaluated (forward evaluations of J)
    gain_lambda_star: float = math.nan  # ΔJ(λ*), realized: how good the quadratic model's optimum is
    # λ̂ as a distribution: a bootstrap over the prompt groups (``groups=``; else nan and empty),
    # docs/estimators.md §5.2 and :func:`decomp.search.bootstrap_optimum`
    lambda_hat_interval: tuple[float, float] = (math.nan, math.nan)  # 95% percentile interval of λ̂
    lambda_hat_positive_prob: float = math.nan  # P(λ̂ > 0)
    lambda_hat_near_optimal: tuple[float, ...] = ()  # evaluated λ not distinguishable from λ̂, sorted
    # sampling errors from the prompt groups' contributions (``groups=``; else 0 groups and nan),
    # docs/estimators.md §5 and :mod:`decomp.uncertainty`
    n_groups: int = 0  # prompt groups of the evaluation batch
    correlation_se: float = math.nan
    cross_se: float = math.nan
    penalty_se: float = math.nan
    predicted_se: float = math.nan
    realized_se: float = math.nan
    correlation_unit_se: float = math.nan
    cross_unit_se: float = math.nan
    penalty_unit_se: float = math.nan
    lambda_star_se: float = math.nan  # delete-one-group jackknife
    noise_groups: float = math.nan  # groups at which C's signal equals its noise: G·SE(C)²/C²

    @property
    def moves_objective(self) -> bool:
        """False when the unit displacement leaves ``J`` unchanged to second order (``C₁ = X₁ =
        P₁ = 0``: e.g. a ``detach`` direction), where no coefficient can matter."""
        return not (self.correlation_unit == 0 and self.cross_unit == 0 and self.penalty_unit == 0)

    def model_gain(self, coef: float) -> float:
        """The quadratic model of the MTP effect at ``λ = coef``: ``λ(C₁ + X₁) − λ²P₁`` (its
        maximiser is ``λ*``)."""
        return coef * (self.correlation_unit + self.cross_unit) - coef * coef * self.penalty_unit

    def to_dict(self) -> dict[str, Any]:
        """The fields as a flat ``dict`` (floats and strings)."""
        return dataclasses.asdict(self)


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
    """A :class:`Decomposition` with the updates and gradients it was computed from.

    ``grad_rl`` is ``∇J`` of the evaluation objective (``None`` once dropped,
    :meth:`without_buffers`); ``gain(λ)`` the realized ``J(θ + u_RL + δ(λ)) − J(θ + u_RL)`` of a
    real counterfactual step at any ``λ`` (:meth:`gains`: many at once); ``row_sets`` the row
    indices of the evaluation batch's prompt groups when it was decomposed by groups (the search's
    bootstrap resamples them).
    """

    decomposition: Decomposition
    step: StepUpdates
    grad_rl: Params | None
    gain: RealizedGain
    row_sets: list[Tensor] | None = None

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
                 rtol: float = SEARCH_RTOL, also: Sequence[float] = ()) -> StepMeasurement:
        """This measurement with the realized optimum ``λ̂ = argmax_λ gain(λ)`` over ``|λ| ≤ bound``
        (:func:`decomp.search.realized_optimum`: a fixed grid and its refinement, independent of
        ``λ*``), its bootstrap over ``row_sets`` when given, and ``ΔJ(λ*)`` (in the grid's
        batch): forward passes only. ``also``: coefficients whose gains :meth:`gains` will read
        (e.g. the estimators'), evaluated in the grid's batch and never candidates for ``λ̂``."""
        return dataclasses.replace(self, decomposition=_with_optimum(self.decomposition, self.gain, bound,
                                                                     evaluations, rtol, self.row_sets, also))

    def gains(self, coefs: list[float]) -> list[float]:
        """``[gain(λ) for λ in coefs]`` in batched forwards (:meth:`RealizedGain.at_coefs`);
        ``nan`` for a non-finite coefficient."""
        finite = [float(c) for c in coefs if math.isfinite(c)]
        values = iter(self.gain.at_coefs(finite)[0].tolist())
        return [next(values) if math.isfinite(c) else math.nan for c in coefs]

    @property
    def grad_mtp(self) -> Params:
        return self.step.grad_mtp

    @property
    def update_grad(self) -> Params:
        return self.step.update_grad

    @property
    def optimizer(self) -> cf_optim.SGD | cf_optim.AdamW:
        return self.step.optimizer


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
    shared: Collection[str] | None
    groups: list[Tensor] | None


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
    groups: list[Tensor] | None = None,
    group_terms: list[Terms] | None = None,
) -> StepMeasurement:
    """``J``'s side of :func:`measure_step` on ``objective`` (called ``name`` in errors) for
    updates built elsewhere; ``realized_dtype`` evaluates the realized changes (and the search)
    in that dtype (:class:`RealizedGain`). ``side``: an :class:`EvaluationSide` of the same
    objective at the same ``θ`` shared with other directions (else one is built and freed).
    ``microbatches > 1``: ``J``'s gradient and both HVPs summed over that many row chunks
    (:func:`decomp.evaluation.microbatched_side`), for the memory of one chunk's second-order graph.
    ``groups``: the row indices of each prompt group of the evaluation batch; the record then
    carries the sampling errors of its terms (:mod:`decomp.uncertainty`) from every group's
    contribution (:func:`decomp.evaluation.group_terms_of`: forward-mode passes over the
    whole batch, whatever the number of groups; the realized change's from the same forward).
    Without ``microbatches`` and a shared second-order ``side``, the whole batch's terms are then
    the groups' sums and ``J``'s side needs only its gradient (:func:`decomp.evaluation.forward_side`:
    no HVP; ``side`` may be a shared :func:`decomp.evaluation.first_order_side`). ``group_terms``:
    the groups' terms already computed for this step on these ``groups`` (e.g. by one pass over
    every direction of an update, :func:`decomp.group_terms.split_group_terms`), used there."""
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise ValueError(f"microbatches must be a positive integer, got {microbatches!r}")
    if groups is not None and side is not None and side.groups is not None:  # shared passes per group
        if [len(r) for r in side.groups.row_sets] != [len(r) for r in groups]:
            raise ValueError("a grouped side must be built on the groups it is given")
        grouped = grouped_side(objective, step, groups, hvp_method, name, side=side)
        group_terms, terms, j_value, g = grouped.group_terms, grouped.terms, grouped.value, grouped.grad
    elif groups is not None and microbatches == 1 and (side is None or side.rl is None):
        step, side, group_terms, terms = forward_side(objective, step, side, groups, name, group_terms)
        j_value, g = side.value, side.grad
    elif microbatches > 1:
        if side is not None:
            raise ValueError("microbatches > 1 builds J's side chunk by chunk and cannot use a shared side")
        side, j_value, g, terms = microbatched_side(objective, step, microbatches, hvp_method, name)
    else:
        step, side, j_value, g, terms = whole_side(objective, step, side, hvp_method, name)
    with torch.random.fork_rng(devices=step.devices), math_attention():
        gain = RealizedGain(objective, step, realized_dtype, side.realized_base)
        side.realized_base = gain.base  # the next direction's, where its θ + u_RL is this one's
        if groups is None:
            realized, realized_parts = gain.at(step.updates.displacement), None
        else:
            realized, realized_parts = gain.at_with_parts(step.updates.displacement, groups)
        if side.realized_rl is None:  # J(θ + u_RL) − J(θ), as every realized value: once per side
            side.realized_rl = gain.rl_step()
    dec = _decomposition(step, side, g, j_value, terms, realized, hvp_method)
    if groups is not None:
        if group_terms is None:  # J's side came from a second-order pass: the groups' from forward mode
            group_terms = group_terms_of(objective, step, groups, name, hvp_method)
        tokens = [int(objective.mask[idx].sum()) for idx in groups]
        dec = dataclasses.replace(dec, **group_errors(group_terms, realized_parts, tokens))
    measured = StepMeasurement(dec, step, g, gain, None if groups is None else list(groups))
    return measured.searched(search_bound, search_evaluations, search_rtol) if search else measured


def _decomposition(step: StepUpdates, side: EvaluationSide, g: Params, j_value: float, terms: Terms,
                   realized: float, hvp_method: str) -> Decomposition:
    c, x, p = terms.correlation, terms.cross, terms.penalty
    lam, lam_nc, reason = optimal_coefficient(terms.correlation_unit, terms.cross_unit, terms.penalty_unit)
    gn_rl, gn_mtp = side.grad_norm, step.grad_norm_mtp
    u_rl, delta = step.updates.update_rl, step.updates.displacement
    g_dot_mtp, uu, dd = dots([(g, step.grad_mtp), (u_rl, u_rl), (delta, delta)])
    cosine = _cosine(g, step) if step.shared is not None else (
        -g_dot_mtp / (gn_rl * gn_mtp) + 0.0 if gn_rl > 0 and gn_mtp > 0 else math.nan)
    return Decomposition(
        correlation=c, cross=x, penalty=p, predicted=c + x - p, realized=realized, residual=realized - (c + x - p),
        lambda_star=lam, lambda_star_no_cross=lam_nc, lambda_star_reason=reason,
        correlation_unit=terms.correlation_unit, cross_unit=terms.cross_unit, penalty_unit=terms.penalty_unit,
        grad_norm_rl=gn_rl, grad_norm_mtp=gn_mtp, cosine=cosine,
        update_norm_rl=uu**0.5, displacement_norm=dd**0.5,
        rl_objective=j_value, mtp_loss=step.mtp_value, realized_rl=side.realized_rl, coef=step.coef,
        optimizer=step.optimizer.name, hvp_method=hvp_method,
    )


def _cosine(g: Params, step: StepUpdates) -> float:
    """``⟨∇J, −∇L_MTP⟩ / (‖∇J‖‖∇L_MTP‖)`` over the shared parameters (``nan`` if either is 0)."""
    keys = sorted(step.shared)
    g_s, m_s = {k: g[k] for k in keys}, {k: step.grad_mtp[k] for k in keys}
    dot_, gg, mm = dots([(g_s, m_s), (g_s, g_s), (m_s, m_s)])
    return -dot_ / math.sqrt(gg * mm) + 0.0 if gg > 0 and mm > 0 else math.nan


def _with_optimum(dec: Decomposition, gain: RealizedGain, bound: float, evaluations: int, rtol: float,
                  row_sets: list[Tensor] | None = None, also: Sequence[float] = ()) -> Decomposition:
    """``dec`` with the realized optimum (:func:`decomp.search.realized_optimum`, bootstrapped
    over ``row_sets`` when given) and ``ΔJ(λ*)``, evaluated in the grid's batch (with ``also``)
    but never a candidate for ``λ̂``."""
    star = [dec.lambda_star] if math.isfinite(dec.lambda_star) else []
    extra = star + [float(c) for c in also if math.isfinite(c)]
    opt = realized_optimum(gain, row_sets=row_sets, extra=extra, bound=bound, max_evaluations=evaluations, rtol=rtol,
                           moves_objective=dec.moves_objective or dec.realized != 0)
    return dataclasses.replace(
        dec, lambda_hat=opt.coef, gain_hat=opt.gain, lambda_hat_reason=opt.reason,
        search_evaluations=opt.evaluations, gain_lambda_star=opt.extra_gains[0] if star else math.nan,
        lambda_hat_interval=opt.interval, lambda_hat_positive_prob=opt.positive_prob,
        lambda_hat_near_optimal=opt.near_optimal,
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
    shared: Collection[str] | None = None,
    groups: list[Tensor] | None = None,
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
        search: also find the realized optimum ``λ̂`` (:func:`decomp.search.realized_optimum`:
            a fixed grid over ``|λ| ≤ search_bound``, refined near the best point), its gain and
            the realized gain at ``λ*``.
        search_bound: the largest ``|λ|`` the search tries (finite, positive).
        search_evaluations: at most this many forward evaluations of ``J`` for the search (at
            least the grid's 20); a search that needs more says so in ``lambda_hat_reason``.
        search_rtol: the search stops when ``λ̂``'s neighbours are within this relative distance.
        microbatches: build ``J``'s side (gradient and both HVPs) over this many row chunks of
            the evaluation batch, one chunk's second-order graph alive at a time: its memory ÷
            ``microbatches``, the same numbers up to float rounding. Needs an objective with
            ``split`` (:class:`decomp.objectives.ImportanceObjective`) and the updates built
            before ``J``'s side (``rl_loss`` or ``eval_objective`` given).
        shared: the names of the parameters the policy and the MTP module share; the record's
            ``cosine`` is taken over them (default: every parameter).
        groups: the row indices of each prompt group of the evaluation batch (e.g.
            :meth:`decomp.objectives.RolloutBatch.group_rows`): the record then carries the
            sampling errors of its terms (``<term>_se``, ``lambda_star_se``, ``n_groups``,
            ``noise_groups``) and, with ``search``, ``λ̂``'s bootstrap distribution
            (docs/estimators.md §5). Needs an objective with ``token_weights``
            (:class:`decomp.objectives.ImportanceObjective`).

    Returns:
        A :class:`StepMeasurement` (the :class:`Decomposition`, the updates, ``∇J`` and the
        realized-gain function). Parameters, optimizer state and the torch RNG state are left
        bit-identical (the RNG is forked, so even a stochastic objective cannot advance it).
    """
    if search:
        check_search(optimizer, search_bound, search_evaluations, search_rtol)
    step = step_updates(rl_objective, mtp_loss, params, coef=coef, lr=lr, optimizer=optimizer,
                        optimizer_state=optimizer_state, rl_loss=rl_loss,
                        defer=rl_loss is None and eval_objective is None, first_order=first_order, shared=shared)
    return decompose_updates(step, rl_objective if eval_objective is None else eval_objective,
                             hvp_method=hvp_method, search=search, search_bound=search_bound,
                             search_evaluations=search_evaluations, search_rtol=search_rtol,
                             name="rl_objective" if eval_objective is None else "eval_objective",
                             realized_dtype=realized_dtype, microbatches=microbatches, groups=groups)


def decompose(
    rl_objective: Callable[[Params], Tensor],
    mtp_loss: Callable[[Params], Tensor],
    params: Params,
    **options: Unpack[MeasureOptions],
) -> Decomposition:
    """The :class:`Decomposition` of :func:`measure_step` (same arguments; see there)."""
    return measure_step(rl_objective, mtp_loss, params, **options).decomposition
