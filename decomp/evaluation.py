"""``J``'s side of a step: the second-order pass on one evaluation objective and the terms it
gives (docs/method.md §3.2): ``C₁, X₁, P₁, C, X, P`` from ``∇J`` and the Hessian's quadratic forms
along the step's updates, over the whole batch or summed over row chunks."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import grad_and_value, jvp, vmap

from decomp.checks import Params, scalar_function
from decomp.curvature import DEFAULT_HVP_METHOD, HVPMethod, batched_by_default, dot, dots, math_attention, second_order
from decomp.updates import StepUpdates, finite_norm, moves, same_params


class QuadraticForms(NamedTuple):
    """The Hessian's quadratic forms one evaluation side needs (``H = ∇²J``); the last two only
    for a nonlinear optimizer (``nan`` otherwise). They add over row chunks of ``J``."""

    cross_unit_form: float  # u_RL·Hδ₁
    unit_form: float  # δ₁·Hδ₁
    cross_form: float = math.nan  # u_RL·Hδ
    displacement_form: float = math.nan  # δ·Hδ

    def plus(self, other: QuadraticForms) -> QuadraticForms:
        return QuadraticForms(*(a + b for a, b in zip(self, other, strict=True)))


class Terms(NamedTuple):
    """The decomposition's terms at unit coefficient and at the step's ``λ`` (docs/method.md §3.2)."""

    correlation_unit: float  # C₁ = ⟨g, δ₁⟩
    cross_unit: float  # X₁ = u_RLᵀHδ₁
    penalty_unit: float  # P₁ = −½δ₁ᵀHδ₁
    correlation: float  # C = ⟨g, δ⟩
    cross: float  # X = u_RLᵀHδ
    penalty: float  # P = −½δᵀHδ


def _quadratic_forms(rl: Any, step: StepUpdates) -> QuadraticForms:
    """The :class:`QuadraticForms` from the HVPs of ``rl``: ``δ₁`` alone for a linear optimizer,
    ``δ₁`` and ``δ`` (in one batched pass where :meth:`decomp.curvature.SecondOrder.hvps` finds
    that faster) for a nonlinear one."""
    u_rl, updates = step.updates.update_rl, step.updates
    vs = [updates.unit_displacement] if step.optimizer.linear else [updates.unit_displacement, updates.displacement]
    products = rl.hvps(vs)
    forms = []
    for v, h_v in zip(vs, products, strict=True):
        forms += dots([(u_rl, h_v), (v, h_v)])
    return QuadraticForms(*forms)


def step_terms(step: StepUpdates, c1: float, x1: float, unit_form: float, c: float = math.nan,
               x: float = math.nan, displacement_form: float = math.nan) -> Terms:
    """The :class:`Terms` from ``C₁``, ``X₁``, ``δ₁ᵀHδ₁`` and, for a nonlinear optimizer, ``C``,
    ``X``, ``δᵀHδ`` (for a linear one ``δ = λδ₁``, so ``C``, ``X``, ``P`` follow from the unit
    terms); ``P = −½·form``."""
    p1 = -0.5 * unit_form + 0.0  # + 0.0: report 0, not -0
    if step.optimizer.linear:
        lam = step.coef
        return Terms(c1, x1, p1, lam * c1, lam * x1, lam * lam * p1 + 0.0)
    return Terms(c1, x1, p1, c, x, -0.5 * displacement_form + 0.0)


def _terms(g: Params, forms: QuadraticForms, step: StepUpdates) -> Terms:
    """The :class:`Terms` from ``∇J`` and the quadratic forms."""
    delta, delta1 = step.updates.displacement, step.updates.unit_displacement
    if step.optimizer.linear:
        return step_terms(step, dot(g, delta1), forms.cross_unit_form, forms.unit_form)
    c1, c = dots([(g, delta1), (g, delta)])
    return step_terms(step, c1, forms.cross_unit_form, forms.unit_form, c, forms.cross_form, forms.displacement_form)


@dataclass
class GroupPasses:
    """``J = Σ_g J_g`` as one second-order pass per prompt group (``J_g`` over the batch's
    normaliser), kept for every direction measured at one update: together they hold about the
    whole batch's graph, and each direction's group terms cost its HVPs on them."""

    passes: list[Any]  # decomp.curvature.SecondOrder per group; None for a group without a response token
    row_sets: list[Tensor]


@dataclass
class EvaluationSide:
    """``J``'s side of one evaluation objective at ``θ``, shareable by every direction measured at
    one update (they share ``θ`` and ``u_RL``; only ``δ`` and ``δ₁`` differ): the second-order
    pass (value, gradient, HVP callable), the realized change of the RL step alone and the
    evaluation at ``θ + u_RL`` every realized change is formed against.

    Holding it keeps ``J``'s second-order graph alive: memory traded for one pass per direction.
    """

    objective: Callable[[Params], Tensor]
    name: str
    rl: Any  # decomp.curvature.SecondOrder; None for a first-order side (first_order_side)
    grad_norm: float
    realized_rl: float | None = None  # J(θ + u_RL) − J(θ), set by the first direction
    realized_base: Any = None  # decomp.realized.BasePoint: J at θ + u_RL, set by the first direction
    value: float = math.nan  # J(θ), on a first-order or grouped side
    grad: Params | None = None  # ∇J(θ), on a first-order or grouped side
    groups: GroupPasses | None = None  # one second-order pass per prompt group (grouped_second_order_side)

    @classmethod
    def at(cls, objective: Callable[[Params], Tensor], theta: Params, devices: list[int], *,
           hvp_method: HVPMethod = DEFAULT_HVP_METHOD, name: str = "eval_objective") -> EvaluationSide:
        J = scalar_function(objective, name)
        with torch.random.fork_rng(devices=devices), math_attention():
            rl = second_order(J, theta, method=hvp_method, name=name)
        return cls(objective, name, rl, _checked_grad_norm(name, float(rl.value), rl.grad))


def grouped_second_order_side(objective: Any, theta: Params, devices: list[int], row_sets: list[Tensor],
                              hvp_method: HVPMethod = DEFAULT_HVP_METHOD,
                              name: str = "eval_objective") -> EvaluationSide:
    """``J``'s side as one second-order pass per prompt group, shared by the directions of an
    update (:func:`grouped_side` with ``side``): the groups' terms from reverse mode, one group's
    pass at a time (:mod:`decomp.group_terms` computes them in one vmapped pass instead, at a
    third to a quarter of its cost on the built-in model: ``benchmarks/group_terms_cost.py``)."""
    _check_splittable(objective, name)
    with torch.random.fork_rng(devices=devices), math_attention():
        passes = [None if part is None else second_order(part, theta, method=hvp_method, name=name)
                  for part in objective.split_rows(row_sets)]
    live = [p for p in passes if p is not None]
    if not live:
        raise ValueError(f"{name} has no response token in any group")
    grad = {k: v.detach().clone() for k, v in live[0].grad.items()}
    for p in live[1:]:
        torch._foreach_add_(list(grad.values()), [p.grad[k] for k in grad])
    value = sum(float(p.value) for p in live)
    return EvaluationSide(objective, name, None, _checked_grad_norm(name, value, grad), value=value, grad=grad,
                          groups=GroupPasses(passes, list(row_sets)))


def _check_splittable(objective: Any, name: str) -> None:
    if not callable(getattr(objective, "split_rows", None)):
        raise ValueError(f"J's side in row chunks or groups needs an objective with split_rows() "
                         f"(decomp.objectives.ImportanceObjective); {name} has none")


def first_order_side(objective: Callable[[Params], Tensor], theta: Params, devices: list[int],
                     name: str = "eval_objective") -> EvaluationSide:
    """``J``'s value and gradient at ``θ`` without a second-order graph (one forward, one
    backward): the side of :func:`forward_side`, whose curvature comes from forward mode."""
    J = scalar_function(objective, name)
    detached = {k: v.detach() for k, v in theta.items()}
    with torch.random.fork_rng(devices=devices), math_attention():
        grad, value = grad_and_value(J)(detached)
    grad = {k: v.detach() for k, v in grad.items()}
    return EvaluationSide(objective, name, None, _checked_grad_norm(name, float(value), grad), value=float(value),
                          grad=grad)


def forward_side(objective: Callable[[Params], Tensor], step: StepUpdates, side: EvaluationSide | None,
                 row_sets: list[Tensor], name: str, group_terms: list[Terms] | None = None
                 ) -> tuple[StepUpdates, EvaluationSide, list[Terms], Terms]:
    """``J``'s side with every group's terms (:func:`group_terms_of`, or ``group_terms`` when a
    pass over several directions gave them: :mod:`decomp.group_terms`) and the whole batch's as
    their sums: no Hessian-vector product, no second-order graph (``side``: a shared
    :func:`first_order_side`, else one built here)."""
    if side is None:
        side = first_order_side(objective, step.theta, step.devices, name)
    if step.updates is None:
        step = step.completed(side.grad)
    if group_terms is None:
        group_terms = group_terms_of(objective, step, row_sets, name)
    elif len(group_terms) != len(row_sets):
        raise ValueError(f"group_terms has {len(group_terms)} groups, the batch {len(row_sets)}")
    whole = Terms(*(math.fsum(t[i] for t in group_terms) + 0.0 for i in range(len(Terms._fields))))
    return step, side, group_terms, whole


def _checked_grad_norm(name: str, value: float, grad: Params) -> float:
    """``‖∇J‖``, once ``J``'s value and gradient are checked finite."""
    if not math.isfinite(value):
        raise ValueError(f"{name} returned a non-finite value ({value})")
    return finite_norm(grad, f"the gradient of {name}")


def whole_side(objective: Callable[[Params], Tensor], step: StepUpdates, side: EvaluationSide | None,
                hvp_method: HVPMethod, name: str) -> tuple[StepUpdates, EvaluationSide, float, Params, Terms]:
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


def microbatched_side(objective: Callable[[Params], Tensor], step: StepUpdates, parts: int, hvp_method: HVPMethod,
                       name: str) -> tuple[EvaluationSide, float, Params, Terms]:
    """``J``'s value, gradient and the six terms summed over ``parts`` contiguous row chunks
    (:func:`grouped_side` with chunks for groups, without per-chunk terms): ``∇J = Σ_c ∇J_c`` and
    ``vᵀHw = Σ_c vᵀH_c w`` exactly, with one chunk's second-order graph alive at a time (its memory
    ÷ ``parts``; more passes, each smaller)."""
    if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        raise ValueError(f"parts must be a positive integer, got {parts!r}")
    rows = getattr(objective, "mask", None)
    if rows is None or not callable(getattr(objective, "split_rows", None)):
        raise ValueError(f"microbatches > 1 needs an objective with split_rows() "
                         f"(decomp.objectives.ImportanceObjective); {name} has none")
    chunks = list(torch.arange(rows.shape[0], device=rows.device).tensor_split(parts))
    whole = grouped_side(objective, step, chunks, hvp_method, name, per_group=False)
    return whole.side, whole.value, whole.grad, whole.terms


@dataclass
class GroupedSide:
    """``J``'s side of one evaluation objective as a sum over its prompt groups: the whole-batch
    value, gradient and terms (sums of the groups', as :func:`microbatched_side` forms them),
    and each group's :class:`Terms` and response-token count (the groups' contributions, which
    add to the whole; :mod:`decomp.uncertainty` turns them into standard errors)."""

    side: EvaluationSide
    value: float
    grad: Params
    terms: Terms
    group_terms: list[Terms]
    group_tokens: list[int]
    row_sets: list[Tensor]


def grouped_side(objective: Any, step: StepUpdates, row_sets: list[Tensor], hvp_method: HVPMethod,
                 name: str, per_group: bool = True, side: EvaluationSide | None = None) -> GroupedSide:
    """One second-order pass per group (``objective.split_rows(row_sets)``), one group's graph
    alive at a time — or the passes of a shared ``side`` (:func:`grouped_second_order_side` on
    these ``row_sets``). Group ``g``'s terms come from its own ``∇J_g`` and quadratic forms
    (``C_g = ⟨∇J_g, δ⟩``, ``X_g = u_RLᵀH_gδ``, ...); every term is linear in ``J``, so the
    groups' terms add to the whole batch's (up to rounding). Groups without a response token
    contribute zeros. ``per_group=False`` skips the groups' own terms (``group_terms`` empty):
    only the sums, for chunks that are not groups."""
    if step.updates is None:
        raise ValueError("J's side in row chunks or groups needs the updates before it: give rl_loss, or an eval_objective")
    _check_splittable(objective, name)
    shared = side.groups.passes if side is not None and side.groups is not None else None
    parts = objective.split_rows(row_sets) if shared is None else shared
    value, g, forms, group_terms, tokens = 0.0, None, None, [], []
    zero = Terms(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    with torch.random.fork_rng(devices=step.devices), math_attention():
        for idx, part in zip(row_sets, parts, strict=True):
            tokens.append(int(objective.mask[idx].sum()))
            if part is None:
                group_terms += [zero] if per_group else []
                continue
            rl = part if shared is not None else second_order(part, step.theta, method=hvp_method, name=name)
            part_forms = _quadratic_forms(rl, step)
            if per_group:
                group_terms.append(_terms(rl.grad, part_forms, step))
            forms = part_forms if forms is None else forms.plus(part_forms)
            if shared is None:  # a shared side summed them once
                value += float(rl.value)
                if g is None:
                    g = rl.grad
                else:
                    torch._foreach_add_(list(g.values()), [rl.grad[k] for k in g])
            del rl
    if shared is not None:
        value, g = side.value, side.grad
    if g is None:
        raise ValueError(f"{name} has no response token in any group")
    if shared is None:
        side = EvaluationSide(objective, name, None, _checked_grad_norm(name, value, g))
    return GroupedSide(side, value, g, _terms(g, forms, step), group_terms, tokens, list(row_sets))


def forward_group_terms(objective: Any, step: StepUpdates, row_sets: list[Tensor], name: str,
                        batched: bool | None = None) -> list[Terms]:
    """Every group's :class:`Terms` from forward-mode passes over the whole batch, the groups'
    number not mattering (:func:`forward_pass` of one step)."""
    return forward_pass(objective, [step], row_sets, name, batched).terms[0]


def forward_group_terms_of_steps(objective: Any, steps: list[StepUpdates], row_sets: list[Tensor], name: str,
                                 batched: bool | None = None) -> list[list[Terms]]:
    """:func:`forward_group_terms` of several steps at one ``θ`` (the directions of one update)."""
    return forward_pass(objective, steps, row_sets, name, batched).terms


@dataclass
class ForwardPass:
    """What :func:`forward_pass` gives for the steps of one update: per step, every group's
    :class:`Terms`, and the per-token ``∇ℓ·δ₁`` and ``∇ℓ·u_RL`` (``[B, T−1]``, the jvp
    estimators' inputs: :meth:`decomp.rules.UpdateContext.jvp`) beside ``ℓ`` itself."""

    terms: list[list[Terms]]
    unit_jvps: list[Tensor]
    rl_jvps: list[Tensor]
    logp: Tensor


def _forward_inputs(objective: Any, steps: list[StepUpdates], name: str) -> Params:
    if any(step.updates is None for step in steps):
        raise ValueError("the groups' terms need the updates before J's side: give rl_loss, or an eval_objective")
    if not callable(getattr(objective, "token_weights", None)):
        raise ValueError(f"the groups' terms need an objective with token_weights() "
                         f"(decomp.objectives.ImportanceObjective); {name} has none")
    return {k: v.detach() for k, v in steps[0].theta.items()}


def forward_pass(objective: Any, steps: list[StepUpdates], row_sets: list[Tensor], name: str,
                 batched: bool | None = None) -> ForwardPass:
    """Every group's terms of every step from forward-mode derivatives of the per-token log-probs
    ``ℓ`` (``objective.logprobs``). Nested ``jvp`` along ``(a, b)`` gives ``ℓ̇_a = ∇ℓ·a``,
    ``ℓ̇_b`` and ``ℓ̈_ab = aᵀ∇²ℓ b`` for every token at once; row ``r``'s share of ``J`` reads
    ``θ`` through its tokens' ``ℓ`` only, so with ``w`` =
    :meth:`~decomp.objectives.ImportanceObjective.token_weights` its ``∇f_r·b = Σ_t w·ℓ̇_b`` and
    ``aᵀ∇²f_r b = Σ_t w·(ℓ̇_a ℓ̇_b + ℓ̈_ab)`` (in float64); a group's terms are its rows' sums, and
    they add to the whole batch's (the second-order pass's, up to rounding).

    Per tangent ``b`` (``δ₁``, and ``δ`` for a nonlinear optimizer) two nested passes: ``(u_RL, b)``
    for ``C``, ``X`` and ``(b, b)`` for ``P``. Steps with the same ``u_RL`` (the directions of one
    update) share its tangent stream: one pass carries ``u_RL`` once and every ``b``
    (``torch.func.vmap`` over the ``b``, where :func:`decomp.curvature.batched_by_default` says so,
    ``batched``; else one pass per tangent). A tangent that moves no parameter ``J`` reads (the
    ``detach`` direction's) is left out of the pass: its derivatives are 0 exactly."""
    theta = _forward_inputs(objective, steps, name)
    tangents, where = [], []  # per step, the indices of its δ₁ and δ (None: linear) among the tangents
    for step in steps:
        u = step.updates
        where.append((len(tangents), None if step.optimizer.linear else len(tangents) + 1))
        tangents += [u.unit_displacement] if step.optimizer.linear else [u.unit_displacement, u.displacement]
    owners = [i for i, step in enumerate(steps) for _ in range(1 if step.optimizer.linear else 2)]
    use = batched_by_default("forward", theta) if batched is None else batched
    live = _moving_tangents(steps, tangents, owners)
    with torch.random.fork_rng(devices=steps[0].devices), math_attention(), torch.no_grad():
        derivatives = _token_derivatives(objective.logprobs, theta, [tangents[i] for i in live],
                                         _by_rl_update(steps, [owners[i] for i in live]), use)
    logp, first, first_rl, second_rl, second = _with_unmoved(derivatives, live, steps, owners)
    w = objective.token_weights(logp)
    rows = [(w * b.double()).sum(1) for b in first], \
        [(w * (a.double() * b.double() + ab.double())).sum(1) for a, b, ab in zip(first_rl, first, second_rl)], \
        [(w * (b.double().square() + bb.double())).sum(1) for b, bb in zip(first, second)]
    rows_c, rows_x, rows_q = (torch.stack(r) for r in rows)  # [tangents, B] each
    sums = [(rows_c[:, idx].sum(1), rows_x[:, idx].sum(1), rows_q[:, idx].sum(1)) for idx in row_sets]
    terms = [[step_terms(step, float(c[i]), float(x[i]), float(q[i]),
                         *(() if j is None else (float(c[j]), float(x[j]), float(q[j])))) for c, x, q in sums]
             for step, (i, j) in zip(steps, where, strict=True)]
    return ForwardPass(terms, [first[i] for i, _ in where], [first_rl[i] for i, _ in where], logp.detach())


def _token_derivatives(f: Callable[[Params], Tensor], theta: Params, tangents: list[Params],
                       by_rl: list[tuple[Params, list[int]]], batched: bool
                       ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """``(ℓ, [ℓ̇_b], [ℓ̇_u], [ℓ̈_ub], [ℓ̈_bb])`` per tangent ``b`` (``u``: its step's ``u_RL``, one
    pass per group of ``by_rl``, :func:`_by_rl_update`), vmapped over the tangents (``batched``)."""
    def cross(a: Params, b: Params) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        return jvp(lambda p: jvp(f, (p,), (b,)), (theta,), (a,))  # ((ℓ, ℓ̇_b), (ℓ̇_a, ℓ̈_ab))

    def diag(b: Params) -> Tensor:
        return jvp(lambda p: jvp(f, (p,), (b,))[1], (theta,), (b,))[1]  # ℓ̈_bb

    def stacked(ts: list[Params]) -> Params:
        return {k: torch.stack([t[k] for t in ts]) for k in theta}

    n = len(tangents)
    first, first_rl, second_rl = [torch.empty(0)] * n, [torch.empty(0)] * n, [torch.empty(0)] * n
    logp = torch.empty(0)
    for u, members in by_rl:  # u's tangent stream once, beside every b of its group (under vmap)
        if batched and len(members) > 1:
            (lp, lb), (la, lab) = vmap(lambda b, u=u: cross(u, b))(stacked([tangents[i] for i in members]))
            parts = [(lp[j], lb[j], la[j], lab[j]) for j in range(len(members))]
        else:
            parts = [(lp, lb, la, lab) for (lp, lb), (la, lab) in (cross(u, tangents[i]) for i in members)]
        for i, (lp, lb, la, lab) in zip(members, parts, strict=True):
            logp, first[i], first_rl[i], second_rl[i] = lp, lb, la, lab
    second = list(vmap(diag)(stacked(tangents)).unbind(0)) if batched and n > 1 else [diag(b) for b in tangents]
    return logp, first, first_rl, second_rl, second


def _moving_tangents(steps: list[StepUpdates], tangents: list[Params], owners: list[int]) -> list[int]:
    """The tangents the pass differentiates along: those that move a parameter ``J`` reads (the
    steps' ``shared``, else all), and one per ``u_RL`` whose tangents all stand still (its pass
    gives ``ℓ`` and ``ℓ̇_u``); along the others every derivative is 0 exactly (:func:`moves`)."""
    live = [i for i, t in enumerate(tangents) if moves(t, steps[0].reads)]
    for i, owner in enumerate(owners):
        rl = steps[owner].updates.update_rl
        if i not in live and not any(same_params(steps[owners[j]].updates.update_rl, rl) for j in live):
            live.append(i)
    return sorted(live)


def _with_unmoved(derivatives: tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]], live: list[int],
                  steps: list[StepUpdates], owners: list[int]
                  ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """:func:`_token_derivatives` of the ``live`` tangents, completed for every tangent: zeros
    along a tangent that moves nothing ``J`` reads, beside its ``u_RL``'s ``ℓ̇_u``."""
    logp, first, first_rl, second_rl, second = derivatives
    at = {i: n for n, i in enumerate(live)}
    zero = torch.zeros_like(logp)

    def rl_jvp(i: int) -> Tensor:
        rl = steps[owners[i]].updates.update_rl
        return next(first_rl[n] for j, n in at.items() if same_params(steps[owners[j]].updates.update_rl, rl))

    n = len(owners)
    return (logp, [first[at[i]] if i in at else zero for i in range(n)],
            [first_rl[at[i]] if i in at else rl_jvp(i) for i in range(n)],
            [second_rl[at[i]] if i in at else zero for i in range(n)],
            [second[at[i]] if i in at else zero for i in range(n)])


def _by_rl_update(steps: list[StepUpdates], owners: list[int]) -> list[tuple[Params, list[int]]]:
    """The tangents (indices, by their steps ``owners``) grouped by their steps' ``u_RL``: equal
    updates (the directions of one update) form one group."""
    groups: list[tuple[Params, list[int]]] = []
    for i, owner in enumerate(owners):
        u = steps[owner].updates.update_rl
        for rl, members in groups:
            if same_params(rl, u):
                members.append(i)
                break
        else:
            groups.append((u, [i]))
    return groups


def group_terms_of(objective: Any, step: StepUpdates, row_sets: list[Tensor], name: str,
                   hvp_method: HVPMethod = DEFAULT_HVP_METHOD) -> list[Terms]:
    """Every group's :class:`Terms`: from :func:`forward_group_terms`, or where the model has an
    operation without forward-over-forward derivatives (e.g. SiLU's backward, in Llama's MLP)
    from one reverse-mode second-order pass per group (:func:`grouped_side`: the same numbers,
    a pass per group)."""
    try:
        return forward_group_terms(objective, step, row_sets, name)
    except NotImplementedError:
        return grouped_side(objective, step, row_sets, hvp_method, name).group_terms
