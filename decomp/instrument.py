"""Instrumentation of one real training update: exact decompositions and every OCC estimator.

Called by the training loop just before an optimizer step, with the live model, the live
optimizer and the mini-batch of that step. For each MTP *direction* —

- ``active``: the run's own regime and coefficient (for ``occ``, this step's estimate ``λ_t``);
- ``ce`` and ``policy``: shadow directions with the fixed coefficient ``c`` (``scale``), measured
  in every run (a ``detach`` run included) to see what joint training would do at this point —

the updates ``u_RL``, ``δ``, ``δ₁`` are built once from the training mini-batch, with the live
AdamW state and the RL update following the gradient of the training loss's RL part (the
clipped surrogate plus the KL term), as the real update does. ``J``'s side is then evaluated on
each *split*: ``train`` (the same mini-batch, in-sample) and, given ``eval_batch``, ``heldout``
(an independent batch of rollouts from the current policy that no update uses). Each
(direction, split) record holds every field of :class:`~decomp.decomposition.Decomposition`,
the realized optimum ``λ̂`` (``search``), and for every estimator rule of :mod:`decomp.rules`
(:func:`~decomp.rules.estimator_rules`) its value ``coef_E`` on the direction's update context,
its realized gain ``gain_E`` and efficiency ``efficiency_E = gain_E/gain_hat`` from a real
counterfactual step, and the quadratic model's ``model_efficiency_E``. The built-in rules: the
proxies (``reference``, ``masked``, ``pooled`` on the response-shaped view of the training
mini-batch, averaged over MTP depths as training averages the depths' coefficients; the same
for every direction), the ``jvp`` level (``jvp_masked``, ``jvp_pooled``) and ``trust_region``
(in the units of ``λ``), both along that direction's ``δ₁`` and ``u_RL``, and ``exact``: the
train split's ``λ*`` (deployable, as it needs only the training batch; on the held-out record,
its realized gain says how well the in-sample quadratic model calibrates ``λ``). A shadow direction identical to the active one is written as a copy marked
``same_as: "active"`` (not a second observation).

Optionally, at the same update:

- a coefficient **sweep** per measured direction and split: the realized ``ΔJ_MTP`` of real
  counterfactual AdamW steps on a grid of ``λ`` around that direction's ``λ*`` (``λ*·[−0.5,
  2.5]``, or ``c·[−20, 20]`` when ``λ*`` is undefined), beside the quadratic model;
- the **curvature** context: the largest and smallest eigenvalues of ``∇²J`` on the mini-batch
  (one Lanczos run, both ends). The Rayleigh quotient of each direction's displacement needs no
  extra work: it is ``−2·penalty / displacement_norm²`` from the decomposition record.

Nothing here changes the parameters, ``.grad``, the optimizer state or the RNG streams.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from decomp.curvature import top_eigenvalues
from decomp.decomposition import StepMeasurement, decompose_updates
from decomp.evaluation import EvaluationSide, Terms, first_order_side
from decomp.group_terms import split_group_terms
from decomp.objectives import Objectives, RolloutBatch, check_eval_batch, objectives
from decomp.occ import efficiency, model_efficiency
from decomp.regimes import CrossEntropy, DistillJoint, Policy, Regime
from decomp.rules import UpdateContext, estimator_rules
from decomp.sweep import sweep_coefficients
from decomp.vocabulary import DIRECTIONS, SPLITS

SWEEP_POINTS = 13
# the directions' group terms come from one pass per split (decomp.group_terms) when every measured
# direction's updates fit in this many bytes at once (8 parameter-sized tensors each); above it
# (a real LM's), each direction's own pass, one direction's updates alive at a time
BATCHED_DIRECTIONS_MEMORY = 1 << 30
EIGEN_TOL = 1e-3  # relative accuracy of the Ritz values: enough to place δ in the spectrum


def shadow_regimes(regime: Regime, scale: float, clip: tuple[float, float] = (0.2, 0.2)) -> dict[str, Regime]:
    """The regimes whose MTP loss defines each direction (see module docstring); the shadow
    ``policy`` direction takes the active regime's form and clip range, else ``clip``."""
    form = getattr(regime, "form", "ratio")
    clips = {"clip_low": getattr(regime, "clip_low", clip[0]), "clip_high": getattr(regime, "clip_high", clip[1])}
    return {
        "active": regime,
        "ce": CrossEntropy(scale=scale),
        "policy": Policy(scale=scale, form=form, **clips),
        "distill-joint": DistillJoint(scale=scale),
    }


def same_direction(a: Regime, b: Regime, coef_a: float, coef_b: float) -> bool:
    # e.g. the shadow `ce` direction of a `ce` run is the active direction itself
    return type(a) is type(b) and a == b and coef_a == coef_b


def sweep_grid(lambda_star: float, scale: float, points: int = SWEEP_POINTS) -> list[float]:
    """``λ*·linspace(−0.5, 2.5)`` (the parabola's roots 0 and 2λ* and its peak inside), or
    ``c·linspace(−20, 20)`` when ``λ*`` is undefined or zero."""
    if math.isfinite(lambda_star) and lambda_star != 0.0:
        return [float(x) for x in lambda_star * np.linspace(-0.5, 2.5, points)]
    return [float(x) for x in scale * np.linspace(-20.0, 20.0, points)]


@dataclass
class Instrumented:
    """What one instrumented update produced (records for each JSONL file)."""

    decompositions: list[dict[str, Any]]
    sweeps: list[dict[str, Any]] = field(default_factory=list)
    curvature: dict[str, Any] | None = None


def estimator_fields(estimates: dict[str, float], measured: StepMeasurement, search: bool) -> dict[str, float]:
    """``coef_E``, the realized ``gain_E`` and ``efficiency_E`` (with ``search``; one forward
    evaluation each), and ``model_efficiency_E``."""
    dec, out = measured.decomposition, {}
    values = measured.gains(list(estimates.values())) if search else [math.nan] * len(estimates)
    gains = dict(zip(estimates, values, strict=True))  # one batched evaluation for every estimator
    for name, coef in estimates.items():
        gain = gains[name]
        out[f"coef_{name}"] = coef
        out[f"gain_{name}"] = gain
        out[f"efficiency_{name}"] = efficiency(gain, dec)
        out[f"model_efficiency_{name}"] = model_efficiency(coef, dec)
    return out


def measure_direction(
    model: nn.Module, splits: dict[str, RolloutBatch], optimizer: torch.optim.Optimizer, regime: Regime,
    coef: float, shared: dict[str, Any], scale: float, loss: dict[str, Any], searched: tuple[str, ...],
    realized_dtype: torch.dtype | None = None, sides: dict[str, EvaluationSide] | None = None,
    microbatches: int = 1, batched_jvp: bool = False, group_errors: bool = False,
    ctx: UpdateContext | None = None, group_terms: dict[str, list[Terms]] | None = None,
) -> list[tuple[dict[str, Any], StepMeasurement, Objectives]]:
    """One record per split for one direction: the updates from the training batch, ``J``'s
    side on each split (from ``sides`` when shared between directions), every estimator rule on
    the direction's :class:`~decomp.rules.UpdateContext` (``shared``: the update's log-probs,
    common to every direction; ``ctx``: the context when the caller built it already); on the
    ``searched`` splits the realized optimum and every estimate's realized gain. ``group_terms``:
    per split, the groups' terms of this direction when a pass over every direction gave them."""
    ctx = ctx or direction_context(model, splits, optimizer, regime, coef, shared, scale, loss, batched_jvp)
    obj, step = ctx.objectives(), ctx.step()  # each timed once, where it is first built
    shared_seconds = ctx.seconds.get("objectives", 0.0) + ctx.seconds.get("updates", 0.0)
    out, estimates = [], {}
    for split, split_batch in splits.items():  # train first: its λ* is the "exact" estimate
        start = time.perf_counter()
        split_obj = obj if split == "train" else objectives(model, split_batch, regime)
        side = (sides or {}).get(split)
        objective = side.objective if side is not None else split_obj.rl_objective
        search = split in searched
        groups = split_batch.group_rows() if group_errors else None
        measured = decompose_updates(step, objective, realized_dtype=realized_dtype, side=side,
                                     microbatches=microbatches, groups=groups,
                                     group_terms=(group_terms or {}).get(split))
        if split == "train":  # every estimator on the training batch (deployable: no held-out data)
            ctx.provide("decomposition", measured.decomposition)
            estimates = {name: rule.value(ctx) for name, rule in estimator_rules().items()}
        search_start = time.perf_counter()
        measured = measured.searched(also=list(estimates.values())) if search else measured
        fields = estimator_fields(estimates, measured, search)
        if split == "heldout2":
            fields.update(other_optimum_fields(out, measured, search))
        end = time.perf_counter()
        record: dict[str, Any] = {"split": split, "same_as": "", "regime_of_direction": regime.name,
                                  **measured.decomposition.to_dict(), **fields,
                                  "seconds": end - start + (shared_seconds if split == "train" else 0.0),
                                  "search_seconds": end - search_start if search else 0.0,
                                  "jvp_seconds": ctx.seconds.get("jvp", 0.0) if split == "train" else 0.0}
        # before the next split's pass, so that they do not sit beside its second-order graph
        measured = measured.without_buffers()
        out.append((record, measured, split_obj))
    return out


def direction_context(model: nn.Module, splits: dict[str, RolloutBatch], optimizer: torch.optim.Optimizer,
                      regime: Regime, coef: float, shared: dict[str, Any], scale: float, loss: dict[str, Any],
                      batched_jvp: bool) -> UpdateContext:
    """The :class:`~decomp.rules.UpdateContext` of one direction on the training batch."""
    return UpdateContext(model, splits["train"], optimizer, regime, coef=coef, scale=scale, loss=loss,
                         batched_jvp=batched_jvp, shared=shared)


def directions_group_terms(contexts: dict[str, UpdateContext], splits: dict[str, RolloutBatch],
                           sides: dict[str, EvaluationSide]) -> tuple[dict[str, dict[str, list[Terms]]],
                                                                        dict[str, float]]:
    """Per split whose shared side is first-order (its curvature is the groups'), every
    direction's group terms from one pass (:func:`decomp.group_terms.split_group_terms`): per
    direction and split, and the seconds each split's pass took (the directions' updates, built
    here, are not counted: each direction's record counts its own). A forward-mode pass on the
    ``train`` split hands each context its per-token ``∇ℓ·δ₁``, ``∇ℓ·u_RL`` and ``ℓ``: the jvp
    estimators' inputs (:meth:`decomp.rules.UpdateContext.jvp`), which then cost nothing more."""
    steps = {direction: (ctx.objectives(), ctx.step())[1] for direction, ctx in contexts.items()}
    terms: dict[str, dict[str, list[Terms]]] = {direction: {} for direction in contexts}
    seconds = {}
    for split, split_batch in splits.items():
        side = sides.get(split)
        if side is None or side.rl is not None or side.groups is not None:
            continue
        start = time.perf_counter()
        per_step, forward = split_group_terms(side.objective, list(steps.values()), split_batch.group_rows(),
                                              side.name)
        for i, (direction, group) in enumerate(zip(steps, per_step, strict=True)):
            terms[direction][split] = group
            if forward is not None and split == "train":
                view = split_batch.response
                contexts[direction].provide("jvp", (view(forward.unit_jvps[i]), view(forward.rl_jvps[i]),
                                                    view(forward.logp)))
        seconds[split] = time.perf_counter() - start
    return terms, seconds


def other_optimum_fields(earlier: list[tuple[dict[str, Any], StepMeasurement, Objectives]],
                         measured: StepMeasurement, search: bool) -> dict[str, float]:
    """``lambda_hat_other``: the ``heldout`` record's ``λ̂``, and ``gain_lambda_hat_other``: its
    realized gain on this (``heldout2``) batch (one forward evaluation; ``nan`` without it)."""
    other = next((r["lambda_hat"] for r, _, _ in earlier if r["split"] == "heldout"), math.nan)
    gain = measured.gain(other) if search and math.isfinite(other) else math.nan
    return {"lambda_hat_other": other, "gain_lambda_hat_other": gain}


def sweep_record(measured: StepMeasurement, regime: Regime, scale: float, coef: float) -> dict[str, Any]:
    """Realized ``ΔJ_MTP`` of real counterfactual steps on :func:`sweep_grid` around ``λ*``."""
    dec = measured.decomposition
    result = sweep_coefficients(measured, sweep_grid(dec.lambda_star, scale))
    return {"regime_of_direction": regime.name, "lambda_star": dec.lambda_star, "lambda_hat": dec.lambda_hat,
            "coef": coef, "coefs": result.coefs, "realized": result.realized, "quadratic": result.quadratic}


def curvature_record(model: nn.Module, batch: RolloutBatch, regime: Regime) -> dict[str, Any]:
    """The largest and smallest eigenvalues of ``∇²J`` on the mini-batch (one Lanczos run)."""
    start = time.perf_counter()
    params = {k: v.detach() for k, v in model.named_parameters()}
    top, bottom = top_eigenvalues(objectives(model, batch, regime).rl_objective, params, k=2, which="BE", tol=EIGEN_TOL)
    return {"eigenvalue_max": float(top), "eigenvalue_min": float(bottom), "seconds": time.perf_counter() - start}


def shared_sides(model: nn.Module, splits: dict[str, RolloutBatch], regime: Regime,
                 share: bool, group_errors: bool = False) -> tuple[dict[str, EvaluationSide], dict[str, float]]:
    """``J``'s second-order pass once per split (``share``), and the seconds each took. With
    ``group_errors`` its value and gradient only: the groups' terms, from their own pass
    (:func:`directions_group_terms`), give the curvature, and the whole batch's is their sum."""
    if not share:
        return {}, {}
    params = {k: v.detach() for k, v in model.named_parameters()}
    devices = sorted({p.device.index or 0 for p in params.values() if p.device.type == "cuda"})
    sides, seconds = {}, {}
    for split, split_batch in splits.items():
        start = time.perf_counter()
        J = objectives(model, split_batch, regime).rl_objective
        name = f"J on the {split} batch"
        if group_errors:
            sides[split] = first_order_side(J, params, devices, name)
        else:
            sides[split] = EvaluationSide.at(J, params, devices, name=name)
        seconds[split] = time.perf_counter() - start
    return sides, seconds


def batch_directions(model: nn.Module, directions: int) -> bool:
    """Whether every direction's updates fit in :data:`BATCHED_DIRECTIONS_MEMORY` at once."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return 8 * params * directions <= BATCHED_DIRECTIONS_MEMORY


def microbatch_count(batch: RolloutBatch, rows: int | None) -> int:
    """Chunks of ``rows`` sequences that cover ``batch`` (1 for ``None``)."""
    if rows is None:
        return 1
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ValueError(f"hvp_microbatch_rows must be a positive integer or None, got {rows!r}")
    return -(-batch.tokens.shape[0] // rows)


def evaluation_splits(model: nn.Module, batch: RolloutBatch, eval_batch: RolloutBatch | None,
                      eval_batch2: RolloutBatch | None = None) -> dict[str, RolloutBatch]:
    """``train`` (the update's own mini-batch), given ``eval_batch`` ``heldout``, and given
    ``eval_batch2`` (a second independent held-out batch: the noise ceiling) ``heldout2``."""
    if eval_batch2 is not None and eval_batch is None:
        raise ValueError("eval_batch2 is the second held-out batch: give eval_batch too")
    splits = {"train": batch}
    for split, held in (("heldout", eval_batch), ("heldout2", eval_batch2)):
        if held is not None:
            check_eval_batch(model, batch, held)
            splits[split] = held
    return splits


def record_count(directions: tuple[str, ...], eval_batch: RolloutBatch | None,
                 eval_batch2: RolloutBatch | None = None) -> int:
    """The decomposition records :func:`instrument_update` writes: one per direction and split."""
    return len(directions) * (1 + (eval_batch is not None) + (eval_batch2 is not None))


def instrument_update(
    model: nn.Module,
    batch: RolloutBatch,
    optimizer: torch.optim.Optimizer,
    regime: Regime,
    *,
    scale: float,
    coef: float,
    clip: tuple[float, float] = (0.2, 0.2),
    kl_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    directions: tuple[str, ...] = DIRECTIONS,
    eval_batch: RolloutBatch | None = None,
    eval_batch2: RolloutBatch | None = None,
    search_splits: tuple[str, ...] = SPLITS,
    realized_dtype: torch.dtype | None = None,
    share_second_order: bool = True,
    hvp_microbatch_rows: int | None = None,
    batched_jvp: bool = False,
    group_errors: bool = False,
    sweep: bool = False,
    curvature: bool = False,
    rl_loss_of_logp: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> Instrumented:  # long only by its docstring and keyword arguments: every option documented here
    """One decomposition record per direction and split for the coming update; with
    ``sweep``/``curvature``, the sweeps and eigenvalues too (module docstring).

    ``scale`` is the run's ``c`` (the shadow directions' ``λ``), ``coef`` the ``λ`` applied at this
    update; ``clip``, ``kl_coef`` and ``ref_logp`` define the RL loss, or ``rl_loss_of_logp``
    replaces it (a trainer's own, of the aligned main log-probs: :func:`decomp.objectives.objectives`).
    ``eval_batch`` adds the ``heldout`` split and ``eval_batch2`` the ``heldout2`` split (a second
    independent held-out batch, whose records also carry ``lambda_hat_other``: the ``heldout``
    record's ``λ̂``, and ``gain_lambda_hat_other``: its realized gain on this batch, a ``λ̂`` that
    does not share the batch it is judged on); the realized optimum is searched on the
    ``search_splits`` (``()``: nowhere); ``realized_dtype`` the realized changes' dtype. ``share_second_order``
    builds ``J``'s second-order pass once per split for every direction (only ``δ``, ``δ₁``
    differ between them), keeping those graphs alive meanwhile; else ``hvp_microbatch_rows``
    sequences per chunk of it (:func:`decomp.decomposition.decompose_updates`' ``microbatches``;
    ``None``: the whole batch at once). ``batched_jvp`` computes the jvp estimators' two
    directional derivatives in one pass (:meth:`decomp.rules.UpdateContext.jvp`; for small models).
    ``group_errors`` adds the sampling errors of the terms to every record from the batches'
    prompt groups (:mod:`decomp.uncertainty`; every direction's group terms from one pass per
    split where the directions' updates fit :data:`BATCHED_DIRECTIONS_MEMORY`,
    :func:`decomp.group_terms.split_group_terms`; else each direction's own forward-mode pass).
    ``on_record`` is called with each record as soon as it is measured (e.g. to advance a progress
    bar over the :func:`record_count` records of the update).
    """
    splits = evaluation_splits(model, batch, eval_batch, eval_batch2)
    microbatches = microbatch_count(batch, hvp_microbatch_rows)
    share_second_order = share_second_order and microbatches == 1
    shared: dict[str, Any] = {}  # the update's log-probs, read by every direction's proxy rules
    loss = {"clip": clip, "kl_coef": kl_coef, "ref_logp": ref_logp, "rl_loss_of_logp": rl_loss_of_logp}
    sides, side_seconds = shared_sides(model, splits, regime, share_second_order, group_errors)
    out = Instrumented([])
    coefs = {"active": coef, "ce": scale, "policy": scale, "distill-joint": scale}
    plan = {d: reg for d, reg in shadow_regimes(regime, scale, clip).items() if d in directions}
    measured_here = [d for d, reg in plan.items() if d == "active" or "active" not in plan
                     or not same_direction(reg, regime, coefs[d], coef)]
    contexts = {d: direction_context(model, splits, optimizer, plan[d], coefs[d], shared, scale, loss, batched_jvp)
                for d in measured_here}
    group_terms: dict[str, dict[str, list[Terms]]] = {}
    pass_share: dict[str, float] = {}  # each direction's share of the one pass of its split's group terms
    if group_errors and sides and batch_directions(model, len(contexts)):
        group_terms, pass_seconds = directions_group_terms(contexts, splits, sides)
        pass_share = {split: seconds / len(contexts) for split, seconds in pass_seconds.items()}
    active: list[dict[str, Any]] = []
    for direction, reg in plan.items():
        if direction not in measured_here:
            copies = [{**r, "direction": direction, "same_as": "active", "seconds": 0.0,
                       "search_seconds": 0.0, "jvp_seconds": 0.0} for r in active]
            out.decompositions += copies
            for record in copies if on_record is not None else ():
                on_record(record)
            continue
        for record, measured, _ in measure_direction(model, splits, optimizer, reg, coefs[direction], shared,
                                                     scale, loss, search_splits, realized_dtype, sides,
                                                     microbatches, batched_jvp, group_errors, contexts.pop(direction),
                                                     group_terms.get(direction)):
            record["seconds"] += side_seconds.pop(record["split"], 0.0)  # the shared pass, on its first user
            record["seconds"] += pass_share.get(record["split"], 0.0)
            out.decompositions.append({"direction": direction, **record})
            if on_record is not None:
                on_record(out.decompositions[-1])
            if direction == "active":
                active.append(record)
            if sweep and measured.decomposition.moves_objective:
                out.sweeps.append({"direction": direction, "split": record["split"],
                                   **sweep_record(measured, reg, scale, coefs[direction])})
    if curvature:
        out.curvature = curvature_record(model, batch, regime)
    return out
