"""The ``k``-step measurement in the reference loop (``horizon`` > 1; docs/method.md §3.6).

An instrumented update ``t`` cannot be judged over ``k`` updates until the loop has drawn the
mini-batches of updates ``t+1 … t+k−1``. So :func:`start_horizon` keeps what the continuation
starts from — the parameters and optimizer state before update ``t``, its mini-batch, the
held-out batches its records were judged on, each direction's ``λ`` and one-step ``λ̂`` — and
:func:`feed_horizons` hands it every later mini-batch the loop trains on; after the ``(k−1)``-th
it measures (:func:`decomp.horizon.measure_horizon`) and writes one ``horizon.jsonl`` record per
direction and split, keyed like the decomposition records (``step``, ``update``, ``direction``,
``split``) plus ``completed_step``. Pending measurements travel in the checkpoint
(:func:`pending_state`), so a resumed run writes the same records; an instrumented update
within ``k−1`` updates of the run's end gets none.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from decomp.horizon import Horizon, OptimizerSnapshot, gradient, measure_horizon, training_rl_loss
from decomp.instrument import same_direction, shadow_regimes
from decomp.objectives import RolloutBatch, objectives
from decomp.search import NO_EFFECT

BATCH_FIELDS = ("tokens", "mask", "advantages", "old_logp", "attention_mask", "groups")
OPTIMIZERS = {cls.__name__: cls for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)}


@dataclass
class PendingHorizon:
    """One instrumented update waiting for the mini-batches of its next ``k − 1`` updates."""

    step: int
    update: int
    theta: dict[str, Tensor]
    optimizer: OptimizerSnapshot
    batch: RolloutBatch
    ref_logp: Tensor | None
    eval_batches: dict[str, RolloutBatch]  # split → the batch the records were judged on
    coef: float  # λ the run applied at this update (the active direction's)
    lambda_hats: dict[str, float]  # "direction/split" → the one-step λ̂
    future: list[tuple[RolloutBatch, Tensor | None]] = field(default_factory=list)


def start_horizon(state: Any, step: int, update: int, mb: RolloutBatch, ref_logp: Tensor | None,
                  eval_batches: dict[str, RolloutBatch], coef: float, records: list[dict[str, Any]]) -> PendingHorizon:
    """Keep what update ``t``'s continuation starts from (before the loop applies it)."""
    named = dict(state.model.named_parameters())
    theta = {k: v.detach().clone() for k, v in named.items()}
    hats = {f"{r['direction']}/{r['split']}": float(r.get("lambda_hat", math.nan)) for r in records}
    return PendingHorizon(step, update, theta, OptimizerSnapshot.of(state.optimizer, named), mb, ref_logp,
                          eval_batches, coef, hats)


def horizon_splits(mb: RolloutBatch, eval_batch: RolloutBatch | None, eval_batch2: RolloutBatch | None
                   ) -> dict[str, RolloutBatch]:
    """Where the ``k``-step gain is judged: the held-out batches, or in-sample without them."""
    if eval_batch is None:
        return {"train": mb}
    return {"heldout": eval_batch, **({} if eval_batch2 is None else {"heldout2": eval_batch2})}


def feed_horizons(state: Any, step: int, mb: RolloutBatch, ref_logp: Tensor | None,
                  dtype: torch.dtype | None = None) -> float:
    """Give every pending measurement the mini-batch of the update the loop is about to take;
    measure and write those that now have their ``k − 1`` (``J`` evaluated in ``dtype``: the
    run's ``realized_dtype``); returns the seconds spent."""
    start = time.perf_counter()
    done = []
    for pending in state.horizons:
        pending.future.append((mb, ref_logp))
        if len(pending.future) == state.cfg.horizon - 1:
            done.append(pending)
    for pending in done:
        state.horizons.remove(pending)
        for record in measure_pending(state, pending, dtype):
            record["completed_step"] = step
            state.logs["horizon"].write(record)
            if state.on_record is not None:
                state.on_record(record)
    return time.perf_counter() - start


def continuation(state: Any, pending: PendingHorizon) -> Horizon:
    """The continuation of ``pending``: from its parameters and optimizer state, update ``t``'s RL
    gradient and the RL losses of the loop's next ``k − 1`` mini-batches (as the loop computes them)."""
    cfg, model = state.cfg, state.model

    def rl_loss(batch: RolloutBatch, ref: Tensor | None):
        return training_rl_loss(model, batch, cfg.clip, cfg.kl_coef, ref)

    first = gradient(rl_loss(pending.batch, pending.ref_logp), pending.theta)
    return Horizon(pending.theta, pending.optimizer, first, tuple(rl_loss(b, r) for b, r in pending.future))


def mtp_gradient(state: Any, pending: PendingHorizon, regime: Any, coef: float) -> dict[str, Tensor]:
    """``∇L_MTP`` of a direction on update ``t``'s mini-batch (the loss training adds at ``coef``)."""
    cfg = state.cfg
    obj = objectives(state.model, pending.batch, regime, coef=coef, clip=cfg.clip, kl_coef=cfg.kl_coef,
                     ref_logp=pending.ref_logp)
    return gradient(obj.mtp_loss, pending.theta)


def direction_coefs(state: Any, pending: PendingHorizon) -> dict[str, tuple[Any, float]]:
    """Each direction's regime and ``λ``, as the instrumented update measured them."""
    cfg = state.cfg
    regimes = shadow_regimes(state.regime, cfg.mtp_scale, cfg.clip)
    return {d: (reg, pending.coef if d == "active" else cfg.mtp_scale) for d, reg in regimes.items()}


def measure_pending(state: Any, pending: PendingHorizon, dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
    """One record per horizon direction and split (module docstring)."""
    cfg = state.cfg
    horizon = continuation(state, pending)
    directions = direction_coefs(state, pending)
    shared = set(state.model.shared_parameter_names())
    out: list[dict[str, Any]] = []
    active: list[dict[str, Any]] = []
    for direction in cfg.horizon_direction_names:
        reg, coef = directions[direction]
        where = {"step": pending.step, "update": pending.update, "regime": cfg.regime, "direction": direction,
                 "regime_of_direction": reg.name, "coef": coef}
        if active and same_direction(reg, state.regime, coef, pending.coef):
            out += [{**r, **where, "same_as": "active", "seconds": 0.0} for r in active]
            continue
        grad_mtp = mtp_gradient(state, pending, reg, coef)
        moves = any(bool(grad_mtp[n].any()) for n in shared)
        for split, batch in pending.eval_batches.items():
            # heldout2 judges the first batch's λ̂_k and λ*_k: optima that do not share its batch
            others = ({f"{key}_other": out[-1].get(key, math.nan) for key in ("lambda_hat_k", "lambda_star_k")}
                      if split == "heldout2" else None)
            record = {**where, "split": split, "same_as": "",
                      **_measure_split(state, horizon, reg, batch, grad_mtp, coef, moves, shared,
                                       pending.lambda_hats.get(f"{direction}/{split}", math.nan), dtype, others)}
            if direction == "active" and cfg.horizon_accuracy and not active:
                record.update(accuracy_after(state, horizon, grad_mtp, {
                    "coef": coef, "lambda_hat_k": record.get("lambda_hat_k", math.nan),
                    "lambda_hat": pending.lambda_hats.get(f"active/{split}", math.nan)}))
            out.append(record)
            if direction == "active":
                active.append(record)
    return out


def accuracy_after(state: Any, horizon: Horizon, grad_mtp: dict[str, Tensor], coefs: dict[str, float]
                   ) -> dict[str, Any]:
    """The task's held-out greedy accuracy at ``θ_k(λ)`` for ``λ = 0`` and each named ``λ`` (``nan``
    where it is undefined): ``accuracy_k_<name>``, its change to ``λ = 0``, ``accuracy_k_<name>_change``
    ``= mean_i(r_i(λ) − r_i(0))`` over the ``n`` problems, and that change's paired standard error
    ``sd_i(r_i(λ) − r_i(0))/√n`` (the problems are the unit; the ``k − 1`` later mini-batches are
    fixed, so this is the error of the evaluation, not of the continuation). The live model's
    parameters hold each end point in turn and are restored bit for bit."""
    named = dict(state.model.named_parameters())
    live = {n: p.detach().clone() for n, p in named.items()}
    rewards: dict[str, Tensor] = {}
    by_coef: dict[float, Tensor] = {}  # two names for one λ (e.g. λ̂_k = the applied λ): one evaluation
    try:
        for name, coef in {"zero": 0.0, **coefs}.items():
            if not math.isfinite(coef):
                continue
            if coef not in by_coef:
                point = horizon.endpoint(grad_mtp, coef)
                with torch.no_grad():
                    for n, p in named.items():
                        p.copy_(point[n])
                with torch.random.fork_rng():
                    by_coef[coef] = state.policy.held_out_rewards().double()
            rewards[name] = by_coef[coef]
    finally:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(live[n])
    base = rewards["zero"]
    out: dict[str, Any] = {"accuracy_problems": int(base.numel()), "accuracy_k_zero": float(base.mean())}
    for name in coefs:
        r = rewards.get(name)
        d = None if r is None else r - base
        out[f"accuracy_k_{name}"] = math.nan if r is None else float(r.mean())
        out[f"accuracy_k_{name}_change"] = math.nan if d is None else float(d.mean())
        out[f"accuracy_k_{name}_change_se"] = (math.nan if d is None or d.numel() < 2
                                               else float(d.std() / math.sqrt(d.numel())))
    return out


def _measure_split(state: Any, horizon: Horizon, reg: Any, batch: RolloutBatch, grad_mtp: dict[str, Tensor],
                   coef: float, moves: bool, shared: set[str], lambda_hat: float,
                   dtype: torch.dtype | None, others: dict[str, float] | None = None) -> dict[str, Any]:
    if not moves:  # e.g. a detach direction: δ = 0 on every parameter J reads, at every horizon
        return {"horizon": horizon.k, "lambda_hat_k": math.nan, "lambda_hat_k_reason": NO_EFFECT,
                "lambda_star_k": math.nan, "gain_k_coef": 0.0, "seconds": 0.0}
    J = objectives(state.model, batch, reg).rl_objective
    rows = batch.group_rows()
    tokens = [float(J.mask[r].sum()) for r in rows]
    return measure_horizon(J, horizon, grad_mtp, coef=coef, row_sets=rows, tokens=tokens, lambda_hat=lambda_hat,
                           dtype=dtype, shared=shared, others=others)


def _batch_state(batch: RolloutBatch) -> dict[str, Any]:
    return {"response_start": batch.response_start, **{k: getattr(batch, k) for k in BATCH_FIELDS}}


def _batch_of(data: dict[str, Any]) -> RolloutBatch:
    return RolloutBatch(data["tokens"], data["mask"], data["advantages"], data["old_logp"], data["response_start"],
                        data["attention_mask"], data["groups"])


def pending_state(pendings: list[PendingHorizon]) -> list[dict[str, Any]]:
    """The pending measurements as plain tensors and numbers (a ``weights_only`` checkpoint)."""
    return [{"step": p.step, "update": p.update, "theta": p.theta, "optimizer_class": p.optimizer.cls.__name__,
             "optimizer_names": [list(n) for n in p.optimizer.names], "optimizer_state": p.optimizer.state_dict,
             "batch": _batch_state(p.batch), "ref_logp": p.ref_logp,
             "eval_batches": {k: _batch_state(b) for k, b in p.eval_batches.items()}, "coef": p.coef,
             "lambda_hats": p.lambda_hats, "future": [[_batch_state(b), r] for b, r in p.future]} for p in pendings]


def restore_pending(data: list[dict[str, Any]]) -> list[PendingHorizon]:
    """:func:`pending_state` read back."""
    out = []
    for d in data:
        snapshot = OptimizerSnapshot(OPTIMIZERS[d["optimizer_class"]], tuple(tuple(n) for n in d["optimizer_names"]),
                                     d["optimizer_state"])
        out.append(PendingHorizon(d["step"], d["update"], d["theta"], snapshot, _batch_of(d["batch"]), d["ref_logp"],
                                  {k: _batch_of(b) for k, b in d["eval_batches"].items()}, d["coef"], d["lambda_hats"],
                                  [(_batch_of(b), r) for b, r in d["future"]]))
    return out
