"""The reference GRPO loop with an MTP module, instrumented with the measurement library.

Every hyperparameter is a field of :class:`~decomp.training.config.TrainConfig`. One training
*step* is one rollout batch: ``prompts_per_step`` prompts × ``group_size`` samples,
group-normalised advantages, then ``epochs × num_minibatches`` AdamW updates on the clipped
surrogate plus the regime's MTP term (the OCC proxy is exactly zero on the first update of an
on-policy batch and carries signal from the second on). Every ``decomp_every`` steps, the last
update of the step is instrumented (:mod:`decomp.instrument`) before it is applied.

Read top to bottom, :func:`train` is: open the run (:func:`open_run`), then per step
:func:`rollout` → :func:`minibatch_partition` → for each update :func:`update_loss` (the
forward and ``λ`` from the regime: its constant or its coefficient rule, :mod:`decomp.training.update`)
→ :func:`~decomp.training.update.backward` → (:func:`instrument`) → :func:`apply_update`, then
:func:`evaluate_and_log` and :func:`save_checkpoint`; finally :func:`finish_run`.

The run directory's files are listed in :mod:`decomp.training.rundir`. Records are appended and
flushed one line at a time. ``resume`` reloads the checkpoint, drops records written after it
(a killed run may have got ahead of its last checkpoint) and continues; since every step's
randomness comes from a generator seeded by ``(seed, step)``, a resumed run writes the same
records as an uninterrupted one.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from decomp import __version__
from decomp.instrument import instrument_update
from decomp.objectives import RolloutBatch
from decomp.regimes import Regime
from decomp.rules import UpdateContext
from decomp.rng import HELDOUT_STREAM, stream_seed
from decomp.runlog import (
    SCHEMA_VERSION,
    JsonlWriter,
    atomic_write,
    atomic_write_text,
    truncate_jsonl,
    write_json,
)
from decomp.training.config import RunError, TrainConfig
from decomp.training.horizons import (
    PendingHorizon,
    feed_horizons,
    horizon_splits,
    pending_state,
    restore_pending,
    start_horizon,
)
from decomp.training.policies import ModelUnavailable, build_policy, rollout
from decomp.training.update import (
    UpdateLoss,
    backward,
    coefficients,
    forward,
    needs_forward,
    update_context,
)
from decomp.training.rundir import (
    LOG_FILES,
    RUN_FILES,
    RunLock,
    check_run_dir,
    load_checkpoint,
    remove_temporaries,
)


@dataclass
class RunResult:
    out: Path
    config: TrainConfig
    warm_accuracy: float
    final_accuracy: float
    steps_done: int
    seconds: float


@dataclass
class RunState:
    """What the loop carries from step to step (built by :func:`open_run`)."""

    cfg: TrainConfig
    out: Path
    policy: Any  # BuiltinPolicy | HFPolicy
    optimizer: torch.optim.Optimizer
    regime: Regime
    start_step: int
    warm_info: dict[str, Any]
    ref_params: dict[str, Tensor] | None  # the warm start's parameters, for the KL term
    logs: dict[str, JsonlWriter] = field(default_factory=dict)
    accuracy: float = float("nan")
    lock: RunLock | None = None  # held while the run writes its folder
    on_record: Callable[[dict[str, Any]], None] | None = None  # told of each measured record (progress)
    horizons: list[PendingHorizon] = field(default_factory=list)  # k-step measurements awaiting their updates

    @property
    def model(self) -> torch.nn.Module:
        return self.policy.model


def open_run(cfg: TrainConfig, out: Path, *, resume: bool, overwrite: bool, cache_dir: Path | None,
             log: Callable[[str], None]) -> RunState:
    """Lock the folder, check it, build the policy (warm start, cached) and optimizer, restore a
    checkpoint when resuming, and open the logs.

    Nothing of an old run is deleted before the new run can start: the model is built (and a
    resumed checkpoint loaded) first, so a bad ``--model`` or a failed warm start leaves the
    folder as it was. On any failure the lock is released (and a folder this call created is
    removed again).
    """
    lock = RunLock(out)
    mode = check_run_dir(out, cfg, resume=resume, overwrite=overwrite)
    lock.acquire()
    try:
        # again, now that no other process can change it
        mode = check_run_dir(out, cfg, resume=resume, overwrite=overwrite, check_lock=False)
        state = _start(cfg, out, mode, cache_dir, log)
    except BaseException:
        lock.release(remove_new=True)
        raise
    state.lock = lock
    return state


def _start(cfg: TrainConfig, out: Path, mode: str, cache_dir: Path | None, log: Callable[[str], None]) -> RunState:
    """:func:`open_run` once the folder is locked and its ``mode`` decided."""
    ckpt = load_checkpoint(out / "checkpoint.pt") if mode == "resume" else None
    try:
        policy = build_policy(cfg, cache_dir, log)
    except ModelUnavailable as err:
        raise RunError(str(err)) from None
    model = policy.model
    ref_params = {k: v.detach().clone() for k, v in model.named_parameters()} if cfg.kl_coef > 0 else None
    regime = cfg.make_regime(cfg.clip)
    shared = set(model.shared_parameter_names())
    # frozen: the MTP module is left out of the optimizer (it stays as the warm start left it)
    trained = [p for n, p in model.named_parameters() if regime.trains_mtp or n in shared]
    opt = torch.optim.AdamW(trained, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                            eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    state = RunState(cfg, out, policy, opt, regime, 0, policy.warm_info, ref_params)
    if ckpt is not None:
        restore_checkpoint(state, ckpt, out / "checkpoint.pt")
    # from here on the folder is written: the new run has everything it needs to start
    removed = remove_temporaries(out)
    if removed:
        log(f"removed {len(removed)} temporary file(s) a killed writer left in {out}")
    if mode == "overwrite":
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    for name in LOG_FILES:
        if ckpt is None:
            (out / name).unlink(missing_ok=True)
        else:
            # a k-step record is written when its measurement completes, after its instrumented step
            key = "completed_step" if name == "horizon.jsonl" else "step"
            truncate_jsonl(out / name, lambda r, key=key: isinstance(r.get(key), int) and r[key] <= state.start_step)
    write_json(out / "config.json", {"config": asdict(cfg), "decomp_version": __version__,
                                     "schema_version": SCHEMA_VERSION})
    state.logs = {name.removesuffix(".jsonl"): JsonlWriter(out / name) for name in LOG_FILES}
    state.accuracy = float(state.warm_info["accuracy"])
    if state.start_step == 0:
        state.logs["metrics"].write({"step": 0, "regime": cfg.regime, "accuracy": state.accuracy,
                                     "warm_start_steps": state.warm_info["steps"]})
    return state


def restore_checkpoint(state: RunState, ckpt: dict[str, Any], path: Path) -> None:
    """Model, optimizer, step and warm-start info from ``ckpt`` (:class:`RunError` if it does
    not fit this run's model, e.g. a checkpoint copied from a run of another architecture)."""
    try:
        state.model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(f"checkpoint {path} does not fit this run's model ({first}); "
                       "pass --overwrite to start over") from None
    state.start_step = int(ckpt["step"])
    state.warm_info = ckpt["warm_start"]
    state.horizons = restore_pending(ckpt.get("horizons", []))


def minibatch_partition(n: int, cfg: TrainConfig, gen: torch.Generator) -> list[Tensor]:
    """The row indices of every update of a step: each epoch a fresh random partition of the
    ``n`` sequences into ``num_minibatches`` mini-batches."""
    return [chunk for _ in range(cfg.epochs)
            for chunk in torch.randperm(n, generator=gen).chunk(cfg.num_minibatches)]


def heldout_batch(state: RunState, step: int, size: int, salt: int = 0) -> RolloutBatch:
    """An independent batch of ``size`` sequences sampled from the current policy: fresh prompts
    from the training pool, group-normalised advantages, ``ℓ^old`` the current log-probs. Its own
    generator, so the training stream (and so every training record) is the same with or without
    instrumentation."""
    cfg = state.cfg
    gen = torch.Generator().manual_seed(stream_seed(cfg.seed, step, HELDOUT_STREAM * (salt + 1)))
    batch, _, _ = rollout(state.policy, cfg, gen, None, prompts=-(-size // cfg.group_size))
    return batch.subset(torch.arange(size))


HELDOUT2_SALT = 1 << 20  # the noise ceiling's second held-out batch: a stream no update's salt reaches


LOOKAHEAD_SALT = 1 << 21  # the oracle's lookahead batches: streams no held-out batch's salt reaches
LOOKAHEAD_MAX = 1 << 10  # lookahead batches per update at most (oracle_horizon − 1)


def lookahead_batches(state: RunState, step: int, update: int, size: int, n: int) -> list[RolloutBatch]:
    """``n`` mini-batches of ``size`` sequences sampled from the current policy, each on its own
    stream: what an oracle over a horizon continues on (the run's own next batches do not exist
    yet, and depend on what the oracle applies)."""
    if n > LOOKAHEAD_MAX:
        raise RunError(f"oracle_horizon must be at most {LOOKAHEAD_MAX + 1}")
    return [heldout_batch(state, step, size, salt=LOOKAHEAD_SALT + update * LOOKAHEAD_MAX + j) for j in range(n)]


def heldout_size(cfg: TrainConfig, mb: RolloutBatch) -> int:
    """Sequences per held-out batch: ``heldout_groups`` prompt groups, else the mini-batch's size."""
    return cfg.heldout_groups * cfg.group_size if cfg.heldout_groups else mb.tokens.shape[0]


def realized_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """``realized_dtype``: ``auto`` is float64 for Hugging Face models (a step at lr 1e-6 moves J
    by about float32's resolution) and the model's own dtype for the built-in one."""
    if cfg.realized_dtype == "auto":
        return None if cfg.model == "builtin" else torch.float64
    return getattr(torch, cfg.realized_dtype)


def instrument(state: RunState, step: int, update: int, mb: RolloutBatch, ref_logp: Tensor | None,
               coef: float) -> None:
    """Measure the coming update (:func:`decomp.instrument.instrument_update`) and log it; with
    ``horizon`` > 1, keep what its ``k``-step measurement starts from (:mod:`decomp.training.horizons`)."""
    cfg = state.cfg
    size = heldout_size(cfg, mb)
    eval_batch = heldout_batch(state, step, size) if cfg.heldout else None
    eval_batch2 = heldout_batch(state, step, size, salt=HELDOUT2_SALT) if cfg.heldout and cfg.noise_ceiling else None
    result = instrument_update(
        state.model, mb, state.optimizer, state.regime, scale=cfg.mtp_scale, coef=coef, clip=cfg.clip,
        kl_coef=cfg.kl_coef, ref_logp=ref_logp, directions=cfg.directions, eval_batch=eval_batch,
        eval_batch2=eval_batch2,
        search_splits=cfg.searched_splits, realized_dtype=realized_dtype(cfg),
        share_second_order=cfg.model == "builtin", hvp_microbatch_rows=cfg.hvp_rows(cfg.model != "builtin"),
        batched_jvp=cfg.model == "builtin",  # one pass for both tangents: faster only on a small model
        group_errors=cfg.group_errors,
        sweep=cfg.due(cfg.sweep_every, step),
        curvature=cfg.due(cfg.curvature_every, step),
        on_record=state.on_record,
    )
    where = {"step": step, "update": update, "regime": cfg.regime}
    for record in result.decompositions:
        state.logs["decomposition"].write({**where, **record})
    for record in result.sweeps:
        state.logs["sweeps"].write({**where, **record})
    if result.curvature is not None:
        state.logs["curvature"].write({**where, **result.curvature})
    if cfg.horizon > 1:
        state.horizons.append(start_horizon(state, step, update, mb, ref_logp,
                                            horizon_splits(mb, eval_batch, eval_batch2), coef, result.decompositions))


def apply_update(state: RunState, mb: RolloutBatch, out: UpdateLoss, sums: dict[str, float]) -> None:
    """The AdamW step; accumulate the step's training statistics in ``sums``."""
    cfg = state.cfg
    state.optimizer.step()
    with torch.no_grad():
        ratio = torch.exp(out.logp.detach() - mb.old_logp)
        clipped = ((ratio < 1 - cfg.clip_low) | (ratio > 1 + cfg.clip_high)) & mb.mask
        sums["clip_fraction"] += float(clipped.sum() / mb.mask.sum().clamp_min(1))
    sums["pg_loss"] += float(out.pg_loss.detach())
    sums["mtp_loss"] += float(out.unit_mtp_loss.detach())
    sums["mtp_coef"] += out.coef
    for name, value in out.metrics.items():  # a regime's or rule's own statistics (occ_estimate_abs, mtp_head_loss)
        sums[name] = sums.get(name, 0.0) + value
    if out.kl is not None:
        sums["kl"] += float(out.kl.detach())


def train_step(state: RunState, step: int) -> dict[str, Any]:
    """One rollout batch and its updates (the last one instrumented on instrumented steps);
    returns the step's metrics record (without evaluation)."""
    cfg = state.cfg
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(stream_seed(cfg.seed, step))
    batch, ref_logp, stats = rollout(state.policy, cfg, gen, state.ref_params)
    partition = minibatch_partition(batch.tokens.shape[0], cfg, gen)
    sums = {"pg_loss": 0.0, "mtp_loss": 0.0, "mtp_coef": 0.0, "kl": 0.0, "clip_fraction": 0.0}
    fallbacks = 0
    decomp_seconds = update_seconds = horizon_seconds = 0.0
    for update, idx in enumerate(partition):
        mb = batch.subset(idx)
        mb_ref = None if ref_logp is None else ref_logp[idx]
        horizon_seconds += feed_horizons(state, step, mb, mb_ref, realized_dtype(cfg)) if state.horizons else 0.0
        t_update = time.perf_counter()
        out, fell_back, ctx = update_loss(state, step, update, mb, mb_ref)
        fallbacks += fell_back
        # backward before the measurements: the forward graph is freed, so the measurement's
        # peak memory does not sit on top of it (nothing measured reads .grad)
        backward(state.model, state.optimizer, out, ctx)
        del ctx  # the rule's parts (updates, gradients, a held-out batch) must not sit beside the measurements
        if cfg.instruments(step) and update == len(partition) - 1:
            t_dec = time.perf_counter()
            instrument(state, step, update, mb, mb_ref, out.coef)
            decomp_seconds += time.perf_counter() - t_dec
        apply_update(state, mb, out, sums)
        update_seconds += time.perf_counter() - t_update
    record: dict[str, Any] = {"step": step, "regime": cfg.regime, **stats}
    record.update({k: v / len(partition) for k, v in sums.items()})
    if state.regime.rule is not None:
        record["fallback_updates"] = fallbacks
    record["decomp_seconds"] = decomp_seconds
    if cfg.horizon > 1:
        record["horizon_seconds"] = horizon_seconds
    # one training update (forward, backward, AdamW) without the measurements: the unit the
    # decomposition's cost is compared with
    record["update_seconds"] = (update_seconds - decomp_seconds) / len(partition)
    record["t0"] = t0
    return record


def update_loss(state: RunState, step: int, update: int, mb: RolloutBatch,
                ref_logp: Tensor | None) -> tuple[UpdateLoss, bool, UpdateContext]:
    """The update's loss with ``λ`` from the regime (:mod:`decomp.training.update`): ``(loss,
    whether the rule's fallback applied, the update's context)``. A rule that reads neither the
    forward's log-probs nor its gradients runs before the forward, so that its passes do not
    sit on top of the forward's graph."""
    cfg, regime = state.cfg, state.regime
    ctx = update_context(state.model, mb, state.optimizer, regime, cfg, ref_logp,
                         heldout=lambda: heldout_batch(state, step, heldout_size(cfg, mb), salt=update + 1),
                         future=lambda n: lookahead_batches(state, step, update, mb.tokens.shape[0], n))
    depths = cfg.mtp_depth
    early = None if regime.rule is None or needs_forward(regime) else coefficients(regime, ctx, None, depths)
    fwd = forward(state.model, regime, mb, ref_logp, cfg)
    coefs, fell_back = early if early is not None else coefficients(regime, ctx, fwd, depths)
    out = fwd.loss_at(coefs)
    out.metrics.update(ctx.metrics)  # the rule's per-update statistics (occ_estimate_abs)
    return out, fell_back, ctx


def evaluate_and_log(state: RunState, step: int, record: dict[str, Any]) -> None:
    """Held-out accuracy every ``eval_every`` steps and at the end; write the metrics record."""
    cfg = state.cfg
    if step % cfg.eval_every == 0 or step == cfg.steps:
        state.accuracy = state.policy.accuracy()
        record["accuracy"] = state.accuracy
    record["seconds"] = time.perf_counter() - record.pop("t0")
    state.logs["metrics"].write(record)


def save_checkpoint(state: RunState, step: int) -> None:
    """The model, optimizer and step, atomically (a failed write, e.g. a full disk, keeps the
    previous checkpoint and ends the run with a :class:`RunError` that says how to go on)."""
    if step % state.cfg.checkpoint_every == 0 or step == state.cfg.steps:
        blob = {"step": step, "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                "warm_start": state.warm_info, "horizons": pending_state(state.horizons)}
        path = state.out / "checkpoint.pt"
        try:
            atomic_write(path, lambda tmp: torch.save(blob, tmp))
        except (OSError, RuntimeError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise RunError(f"could not write {path} at step {step} ({reason}); the previous checkpoint is kept: "
                           "free disk space and rerun with --resume") from None


def finish_run(state: RunState, seconds: float) -> RunResult:
    cfg = state.cfg
    if state.start_step >= cfg.steps:  # a finished run "resumed" without more steps
        state.accuracy = state.policy.accuracy()
    warm = float(state.warm_info["accuracy"])
    atomic_write_text(state.out / "summary.json", json_summary(cfg, warm, state.accuracy, state.warm_info))
    return RunResult(state.out, cfg, warm, state.accuracy, cfg.steps, seconds)


def json_summary(cfg: TrainConfig, warm: float, final: float, warm_info: dict[str, Any]) -> str:
    return json.dumps({"regime": cfg.regime, "seed": cfg.seed, "task": cfg.task, "steps": cfg.steps,
                       "warm_accuracy": warm, "final_accuracy": final, "warm_start": warm_info}, indent=2)


SLOW_RECORD_SECONDS = 30.0


class Progress:
    """A bar on a terminal; in a log (CI, nohup) a status line every 10% of the run instead."""

    def __init__(self, state: RunState, enabled: bool, log: Callable[[str], None]) -> None:
        cfg = state.cfg
        self.cfg, self.log, self.bar = cfg, log, None
        self.line_every = max(1, cfg.steps // 10) if enabled and not sys.stderr.isatty() else 0
        if enabled and not self.line_every:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=state.start_step, desc=f"{cfg.regime} s{cfg.seed}",
                            unit="step", leave=True)

    def update(self, step: int, reward: float, accuracy: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{reward:.2f}", acc=f"{accuracy:.1%}", refresh=False)
            self.bar.update(1)
        elif self.line_every and (step % self.line_every == 0 or step == self.cfg.steps):
            self.log(f"{self.cfg.regime} seed {self.cfg.seed}: step {step}/{self.cfg.steps} reward {reward:.2f} "
                     f"accuracy {accuracy:.1%}")

    def measured(self, record: dict[str, Any]) -> None:
        """Show the record just measured at an instrumented update (a real LM's take minutes each);
        in a log, only records that took over :data:`SLOW_RECORD_SECONDS`."""
        where = f"{record.get('direction', '?')}/{record.get('split', '?')} {record.get('seconds', 0.0):.0f}s"
        if self.bar is not None:
            self.bar.set_postfix_str(f"measured {where}", refresh=True)
        elif self.line_every and record.get("seconds", 0.0) > SLOW_RECORD_SECONDS:
            self.log(f"{self.cfg.regime} seed {self.cfg.seed}: measured {where}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    cfg: TrainConfig,
    out: Path | str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    cache_dir: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
) -> RunResult:
    """Run (or resume) one instrumented GRPO run into ``out``; see the module docstring.

    ``stop_after`` ends the run abruptly after that step's records are written and before its
    checkpoint, as a kill would (for tests of ``resume``).
    """
    cfg.validate()
    t_start = time.perf_counter()
    state = open_run(cfg, Path(out), resume=resume, overwrite=overwrite, cache_dir=cache_dir, log=log)
    bar = Progress(state, progress, log)
    state.on_record = bar.measured
    try:
        for step in range(state.start_step + 1, cfg.steps + 1):
            record = train_step(state, step)
            evaluate_and_log(state, step, record)
            bar.update(step, record["reward_mean"], state.accuracy)
            if stop_after is not None and step >= stop_after:
                warm = float(state.warm_info["accuracy"])
                return RunResult(state.out, cfg, warm, state.accuracy, step, time.perf_counter() - t_start)
            save_checkpoint(state, step)
        return finish_run(state, time.perf_counter() - t_start)
    finally:
        for writer in state.logs.values():
            writer.close()
        bar.close()
        state.lock.release()
