"""Every prompt group's terms for all the directions of one update in one pass (docs/estimators.md
§5.1): the groups' gradients and Hessian-vector products by reverse mode, vmapped over the groups
and over the directions' displacements.

For group ``g`` with ``J_g`` its share of ``J`` (over the batch's normaliser) and a displacement
``b`` of a direction whose RL update is ``a = u_RL``, one ``jvp`` of ``∇J_g`` along ``b`` gives
``H_g b``; then ``C_g = ∇J_g·b``, ``X_g = aᵀH_g b`` and ``bᵀH_g b = −2P_g``. Each direction adds two
tangents (``δ₁``, and ``δ`` for a nonlinear optimizer) to one pass that computes ``∇J_g`` once
(:func:`torch.func.vmap` over the groups, padded to the largest with rows that count zero, and
over the tangents). Forward mode (:func:`decomp.evaluation.forward_pass`) needs two
nested-``jvp`` pairs per tangent instead, but its cost grows with the rows, not the groups: on
the built-in model the reverse pass costs about half of forward mode's on groups of 8, and more
on a mini-batch's small ragged groups (:func:`split_group_terms` picks;
``benchmarks/group_terms_cost.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from decomp.checks import Params
from decomp.curvature import math_attention
from decomp.evaluation import ForwardPass, Terms, forward_pass, group_terms_of, step_terms
from decomp.updates import StepUpdates, moves

# bytes of per-group products a pass holds at once: the groups go through vmap in chunks beyond it
GROUP_MEMORY = 1 << 28
# the reverse pass costs about 12 ms per group and 0.3 ms per (padded) row, forward mode's one
# pass about 3.2 ms per row, whatever the groups (three directions on the built-in model, 64 rows:
# 8 groups of 8 118 ms against 208, 16 ragged groups of 1–7 231 ms against 204;
# benchmarks/group_terms_cost.py, 2026-12-07): reverse where groups average 5 rows or more
REVERSE_MIN_MEAN_ROWS = 5


def _dot(x: Params, y: Params) -> Tensor:
    """``⟨x, y⟩`` accumulated in float64 (each product in the tensors' dtype: a float32 product
    is exact to 6e-8, while a float32 sum over many of them is not); a tensor, under ``vmap``."""
    return sum((x[k] * y[k]).sum(dtype=torch.float64) for k in x)


def padded_rows(row_sets: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(idx, valid)``, both ``[G, m]`` with ``m`` the largest set: each set's row indices
    padded with its first row (or row 0), and 1.0 where a row is its own, 0.0 on padding."""
    m = max(1, max(len(r) for r in row_sets))
    device = row_sets[0].device
    idx = torch.zeros(len(row_sets), m, dtype=torch.long, device=device)
    valid = torch.zeros(len(row_sets), m, device=device)
    for i, rows in enumerate(row_sets):
        n = len(rows)
        if n:
            idx[i, :n], idx[i, n:], valid[i, :n] = rows, rows[0], 1.0
    return idx, valid


def has_rows_value(objective: Any) -> bool:
    """Whether ``objective`` gives a group's value as a function ``torch.func.vmap`` can batch."""
    return getattr(objective, "rows_logprobs", None) is not None and callable(getattr(objective, "rows_value", None))


def _tangents(steps: Sequence[StepUpdates]) -> tuple[list[Params], list[Params], list[tuple[int, int | None]]]:
    """The tangents ``b`` and their directions' ``u_RL`` (``a``), and per step the index of
    ``δ₁`` and of ``δ`` (``None`` for a linear optimizer, whose ``δ = λδ₁``)."""
    bs, as_, where = [], [], []
    for step in steps:
        if step.updates is None:
            raise ValueError("the groups' terms need the updates before J's side: give rl_loss, or an eval_objective")
        u = step.updates
        where.append((len(bs), None if step.optimizer.linear else len(bs) + 1))
        bs += [u.unit_displacement] if step.optimizer.linear else [u.unit_displacement, u.displacement]
        as_ += [u.update_rl] * (1 if step.optimizer.linear else 2)
    return bs, as_, where


def _check_same_theta(steps: Sequence[StepUpdates]) -> Params:
    theta = steps[0].theta
    for step in steps[1:]:
        if step.shared != steps[0].shared or step.theta.keys() != theta.keys() or any(
                step.theta[k].data_ptr() != theta[k].data_ptr() or step.theta[k].shape != theta[k].shape
                for k in theta):
            raise ValueError("the directions of one pass must share θ (the updates of one update)")
    return {k: v.detach() for k, v in theta.items()}


def reverse_group_terms(objective: Any, steps: Sequence[StepUpdates], row_sets: Sequence[Tensor],
                        memory: int = GROUP_MEMORY) -> list[list[Terms]]:
    """Per step, every group's :class:`~decomp.evaluation.Terms` (the module docstring's pass),
    from ``objective.rows_value`` (:meth:`decomp.objectives.ImportanceObjective.rows_value`);
    they add to the whole batch's terms. ``memory`` bounds the groups' products held at once."""
    if not has_rows_value(objective):
        raise ValueError("the groups' reverse-mode pass needs an objective with a vmappable rows_value() "
                         "(decomp.objectives.objectives builds one)")
    theta = _check_same_theta(steps)
    # J reads the policy's parameters only: the MTP module's own (a third of the built-in model)
    # have ∇J_g = H_g·b = 0, and leaving them out spares their per-group products
    live = {k: theta[k] for k in steps[0].reads}
    fixed = {k: v for k, v in theta.items() if k not in live}
    all_bs, all_as, where = _tangents(steps)
    # a tangent that moves nothing J reads (the detach direction's) has exact zeros for terms
    moving = [i for i, b in enumerate(all_bs) if moves(b, live)]
    bs, as_ = [all_bs[i] for i in moving], [all_as[i] for i in moving]
    if not bs:
        zero = [[0.0] * len(row_sets) for _ in all_bs]
        return _terms_of(steps, where, zero, zero, zero, len(row_sets))
    idx, valid = padded_rows(row_sets)
    b_stack = {k: torch.stack([b[k] for b in bs]) for k in live}
    a_stack = {k: torch.stack([a[k] for a in as_]) for k in live}

    # one prompt's rollouts share their positions before the response: each group runs them once
    shares = getattr(objective, "rows_share_prefix", None)
    one_prefix = bool(shares is not None and shares(row_sets))

    def value(p: Params, rows: Tensor, keep: Tensor) -> Tensor:
        return objective.rows_value({**fixed, **p}, rows, keep, one_prefix) if one_prefix else \
            objective.rows_value({**fixed, **p}, rows, keep)

    def per_group(rows: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        def along(b: Params, a: Params) -> tuple[Tensor, Tensor, Tensor]:
            g, h_b = jvp(lambda p: grad(value)(p, rows, keep), (live,), (b,))
            return _dot(g, b), _dot(h_b, a), _dot(h_b, b)
        return vmap(along)(b_stack, a_stack)

    per_group_bytes = len(bs) * sum(t.numel() for t in live.values()) * 8 * 3
    chunk = max(1, memory // max(per_group_bytes, 1))
    with torch.random.fork_rng(devices=steps[0].devices), math_attention():
        first, cross, quad = vmap(per_group, chunk_size=chunk)(idx, valid)  # [G, tangents] each
    rows = {i: n for n, i in enumerate(moving)}
    first, cross, quad = ([values[rows[i]] if i in rows else [0.0] * len(row_sets) for i in range(len(all_bs))]
                          for values in (first.T.tolist(), cross.T.tolist(), quad.T.tolist()))
    return _terms_of(steps, where, first, cross, quad, len(row_sets))


def _terms_of(steps: Sequence[StepUpdates], where: list[tuple[int, int | None]], first: list[list[float]],
              cross: list[list[float]], quad: list[list[float]], groups: int) -> list[list[Terms]]:
    """Per step, each group's terms from the per-tangent, per-group products (``[tangent][group]``)."""
    out = []
    for step, (i, j) in zip(steps, where, strict=True):
        terms = []
        for gi in range(groups):
            nonlinear = () if j is None else (first[j][gi], cross[j][gi], quad[j][gi])
            terms.append(step_terms(step, first[i][gi], cross[i][gi], quad[i][gi], *nonlinear))
        out.append(terms)
    return out


def split_group_terms(objective: Any, steps: Sequence[StepUpdates], row_sets: Sequence[Tensor],
                      name: str) -> tuple[list[list[Terms]], ForwardPass | None]:
    """Per step, every group's terms from one pass over all the steps: :func:`reverse_group_terms`
    where the groups hold :data:`REVERSE_MIN_MEAN_ROWS` rows or more on average, else forward
    mode (:func:`decomp.evaluation.forward_pass`, which also gives the per-token directional
    derivatives, returned beside the terms; ``None`` from the other passes); where the objective
    or the model cannot run them (no vmappable rows; an operation without forward-mode
    derivatives such as SiLU's backward in Llama's MLP) each step's own
    :func:`decomp.evaluation.group_terms_of`."""
    rows = sum(len(r) for r in row_sets)
    if has_rows_value(objective) and rows >= REVERSE_MIN_MEAN_ROWS * len(row_sets):
        try:
            return reverse_group_terms(objective, steps, row_sets), None
        except (NotImplementedError, RuntimeError):  # RuntimeError: vmap cannot batch the model
            pass
    try:
        forward = forward_pass(objective, list(steps), list(row_sets), name)
        return forward.terms, forward
    except NotImplementedError:
        return [group_terms_of(objective, step, list(row_sets), name) for step in steps], None
