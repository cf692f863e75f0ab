"""The reference GRPO loop with an MTP module, instrumented with the measurement library.

Every hyperparameter is a field of :class:`TrainConfig`, with its default and meaning. One
training *step* is one rollout batch: ``prompts_per_step`` prompts × ``group_size`` samples,
group-normalised advantages, then ``epochs × num_minibatches`` AdamW updates on the clipped
surrogate plus the regime's MTP term (the OCC proxy is exactly zero on the first update of an
on-policy batch and carries signal from the second on). Every ``decomp_every`` steps, the last
update of the step is instrumented (:mod:`decomp.instrument`) before it is applied.

Run directory::

    config.json          the TrainConfig, decomp version and schema version
    metrics.jsonl        one record per step (step 0: the warm start's held-out accuracy)
    decomposition.jsonl  one record per instrumented update and direction
    sweeps.jsonl         realized ΔJ_MTP over a grid of λ, per direction, every sweep_every steps
    curvature.jsonl      extreme Hessian eigenvalues of J, every curvature_every steps
    checkpoint.pt        model + optimizer at the last checkpointed step (atomic replace)
    summary.json         written when the run completes

Records are appended and flushed one line at a time. ``resume`` reloads the checkpoint, drops
records written after it (a killed run may have got ahead of its last checkpoint) and continues;
since every step's randomness comes from a generator seeded by ``(seed, step)``, a resumed run
writes the same records as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from decomp import __version__
from decomp.instrument import DIRECTIONS, instrument_update
from decomp.model import ModelConfig, aligned_logprobs
from decomp.occ import REDUCTIONS
from decomp.policies import ModelUnavailable, build_policy, rollout
from decomp.regimes import REGIMES, Regime, make_regime
from decomp.rl import clipped_policy_loss, kl_k3, masked_mean
from decomp.runlog import SCHEMA_VERSION, JsonlWriter, truncate_jsonl
from decomp.tasks import TASKS, VOCAB_SIZE, Task
from decomp.warmstart import WarmStartConfig

TEXT_TASKS = ("add1", "add")


class RunError(ValueError):
    """A problem with the user's input or run directory (the CLI prints it and exits with 2)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run. Defaults: the reference run on ``add``."""

    # what to run
    regime: str = "detach"  # detach | detach-inputs | ce | policy | occ
    task: str = "add"  # builtin model: add | chain; Hugging Face model: add1 | add
    seed: int = 0  # seeds the warm start, rollouts and mini-batch order
    steps: int = 200  # RL steps (rollout batches)
    model: str = "builtin"  # builtin | smollm2-135m | path of a local Hugging Face checkpoint folder
    dataset: str = ""  # Hugging Face model: JSONL file of question/answer records (replaces task)
    reward: str = "auto"  # Hugging Face model: last_integer | math | auto (math for datasets)
    max_new_tokens: int = 0  # Hugging Face model: response length limit (0: the task's default)
    mtp_init: str = "copy_last"  # Hugging Face model: MTP block from the last layer (copy_last) or random
    mtp_warmup_steps: int = 30  # Hugging Face model: detached-CE steps warming up the MTP module
    mtp_warmup_lr: float = 1e-3  # Hugging Face model: AdamW learning rate of the MTP warm-up
    # model (the built-in MTP transformer; vocab and length come from the task)
    d_model: int = 64  # residual width
    n_layers: int = 2  # main transformer blocks
    n_heads: int = 4  # attention heads
    d_mlp: int = 256  # MLP hidden width
    mtp_depth: int = 1  # MTP modules K
    # rollouts
    prompts_per_step: int = 16  # distinct prompts per rollout batch
    group_size: int = 8  # samples per prompt G (GRPO group)
    # policy update
    lr: float = 0.0  # AdamW learning rate; 0: the model family's default (builtin 3e-4, Hugging Face 1e-6)
    beta1: float = 0.9  # AdamW β₁
    beta2: float = 0.999  # AdamW β₂
    adam_eps: float = 1e-8  # AdamW ε
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    num_minibatches: int = 2  # mini-batches per rollout batch
    epochs: int = 1  # passes over the rollout batch (updates = epochs × num_minibatches)
    clip_low: float = 0.2  # PPO clip: ratio ≥ 1 − clip_low
    clip_high: float = 0.2  # PPO clip: ratio ≤ 1 + clip_high
    kl_coef: float = 0.0  # weight of the k3 KL to the warm-start policy (0: off)
    # MTP
    mtp_coef: float = 0.1  # c: the MTP coefficient (occ: the estimator's scale)
    policy_form: str = "ratio"  # policy/occ MTP loss: ratio (reference) | reinforce
    occ_estimator: str = "masked"  # occ: reference | masked | pooled
    # warm start (supervised, cached)
    sft_lr: float = 3e-3  # warm-start AdamW learning rate
    sft_batch_size: int = 128  # warm-start sequences per step
    sft_mtp_coef: float = 0.3  # warm-start MTP CE weight
    sft_target_accuracy: float = 0.3  # warm start stops at this held-out accuracy
    # evaluation, instrumentation, checkpoints
    eval_every: int = 10  # steps between held-out greedy evaluations (and at the end)
    decomp_every: int = 5  # steps between instrumented updates (0: never)
    decomp_directions: str = "active,ce,policy"  # MTP directions measured at each instrumented update
    sweep_every: int = 50  # steps between coefficient sweeps (multiple of decomp_every; 0: never)
    curvature_every: int = 50  # steps between Hessian eigenvalue runs (multiple of decomp_every; 0: never)
    checkpoint_every: int = 10  # steps between checkpoints (and at the end)

    def validate(self) -> None:
        """Raise :class:`RunError` naming the first invalid field."""
        if self.regime not in REGIMES:
            raise RunError(f"unknown regime {self.regime!r}; valid regimes: {', '.join(REGIMES)}")
        if self.model == "builtin":
            if self.task not in TASKS:
                raise RunError(f"unknown task {self.task!r}; valid tasks: {', '.join(TASKS)}")
            if self.dataset:
                raise RunError("--dataset needs a Hugging Face model (--model smollm2-135m or a checkpoint folder)")
        elif not self.dataset and self.task not in TEXT_TASKS:
            raise RunError(f"unknown task {self.task!r} for a Hugging Face model; valid tasks: {', '.join(TEXT_TASKS)} "
                           "(or --dataset FILE.jsonl)")
        if self.reward not in ("auto", "last_integer", "math"):
            raise RunError(f"unknown reward {self.reward!r}; valid rewards: auto, last_integer, math")
        if self.mtp_init not in ("copy_last", "random"):
            raise RunError(f"mtp_init must be copy_last or random, got {self.mtp_init!r}")
        directions = [d.strip() for d in self.decomp_directions.split(",") if d.strip()]
        if not directions or any(d not in DIRECTIONS for d in directions):
            raise RunError(f"decomp_directions must be a comma-separated subset of {', '.join(DIRECTIONS)}, "
                           f"got {self.decomp_directions!r}")
        for name in ("steps", "d_model", "n_layers", "n_heads", "d_mlp", "prompts_per_step", "group_size",
                     "num_minibatches", "epochs", "sft_batch_size", "eval_every", "checkpoint_every", "mtp_warmup_steps"):
            if getattr(self, name) < 1:
                raise RunError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.decomp_every < 0 or self.mtp_depth < 1:
            raise RunError("decomp_every must be >= 0 and mtp_depth >= 1")
        for name in ("sweep_every", "curvature_every"):  # both happen on instrumented updates only
            every = getattr(self, name)
            if every < 0 or (every and self.decomp_every and every % self.decomp_every):
                raise RunError(f"{name} must be 0 or a positive multiple of decomp_every ({self.decomp_every}), got {every}")
        if self.group_size < 2:
            raise RunError(f"group_size must be at least 2 for group-normalised advantages, got {self.group_size}")
        if self.num_minibatches > self.prompts_per_step * self.group_size:
            raise RunError("num_minibatches exceeds the number of sequences per step")
        if self.max_new_tokens < 0:
            raise RunError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.lr >= 0:
            raise RunError(f"lr must be non-negative (0: the default), got {self.lr}")
        for name in ("sft_lr", "mtp_warmup_lr"):
            if not getattr(self, name) > 0:
                raise RunError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "clip_low", "clip_high", "kl_coef", "adam_eps"):
            if not getattr(self, name) >= 0:
                raise RunError(f"{name} must be non-negative, got {getattr(self, name)}")
        if not math.isfinite(self.mtp_coef):
            raise RunError(f"mtp_coef must be finite, got {self.mtp_coef}")
        if self.policy_form not in ("ratio", "reinforce"):
            raise RunError(f"policy_form must be 'ratio' or 'reinforce', got {self.policy_form!r}")
        if self.occ_estimator not in REDUCTIONS:
            raise RunError(f"occ_estimator must be one of {', '.join(REDUCTIONS)}, got {self.occ_estimator!r}")
        if self.d_model % self.n_heads:
            raise RunError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")

    def model_config(self, task: Task) -> ModelConfig:
        return ModelConfig(
            vocab_size=VOCAB_SIZE, max_len=task.seq_len, d_model=self.d_model, n_layers=self.n_layers,
            n_heads=self.n_heads, d_mlp=self.d_mlp, mtp_depth=self.mtp_depth,
        )

    @property
    def learning_rate(self) -> float:
        """``lr``, or the model family's default when ``lr`` is 0."""
        if self.lr:
            return self.lr
        return 3e-4 if self.model == "builtin" else 1e-6

    def warmstart_config(self) -> WarmStartConfig:
        return WarmStartConfig(
            lr=self.sft_lr, batch_size=self.sft_batch_size, mtp_coef=self.sft_mtp_coef,
            target_accuracy=self.sft_target_accuracy,
        )

    def make_regime(self) -> Regime:
        options: dict[str, Any] = {"coef": self.mtp_coef}
        if self.regime in ("policy", "occ"):
            options.update(form=self.policy_form, clip_low=self.clip_low, clip_high=self.clip_high)
        if self.regime == "occ":
            options["estimator"] = self.occ_estimator
        return make_regime(self.regime, **options)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
LOG_FILES = ("metrics.jsonl", "decomposition.jsonl", "sweeps.jsonl", "curvature.jsonl")
RUN_FILES = ("config.json", *LOG_FILES, "checkpoint.pt", "summary.json")


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RunError(f"unknown config fields: {', '.join(unknown)}")
    return TrainConfig(**data)


def _stream_seed(seed: int, step: int) -> int:
    # one independent, reproducible random stream per (seed, step): resuming needs no RNG state
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**63 - 1)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _atomic_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _config_diff(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    keys = sorted((set(a) | set(b)) - set(ignore))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def _saved_run_config(config_path: Path) -> dict[str, Any] | None:
    """The TrainConfig dict of a decomp run's ``config.json``; ``None`` if it is not one."""
    try:
        data = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and "schema_version" in data and isinstance(data.get("config"), dict):
        return data["config"]
    return None


def check_run_dir(out: Path, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> str:
    """Decide what to do with ``out`` without touching it: ``"new"``, ``"resume"`` or ``"overwrite"``.

    Raises :class:`RunError` when the folder holds a different run (unless ``overwrite``), the
    same run (unless ``resume`` or ``overwrite``), or anything that is not a decomp run: files
    that decomp did not write are never replaced, ``--overwrite`` or not.
    """
    out = Path(out)
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a directory")
    config_path = out / "config.json"
    if not config_path.exists():
        if out.exists() and any(out.iterdir()):
            raise RunError(f"{out} is not empty and holds no decomp run; choose an empty or new --out")
        return "new"
    saved = _saved_run_config(config_path)
    if saved is None:
        raise RunError(f"{config_path} is not a decomp run's config; choose another --out")
    if overwrite:
        return "overwrite"
    if not resume:
        diff = _config_diff(saved, asdict(cfg))
        if diff:
            raise RunError(f"{out} holds a run with a different config ({'; '.join(diff)}); pass --overwrite to replace it")
        raise RunError(f"{out} already holds this run; pass --resume to continue it or --overwrite to start over")
    diff = _config_diff(saved, asdict(cfg), ignore=("steps",))
    if diff:
        raise RunError(f"cannot resume {out}: the config differs ({'; '.join(diff)})")
    if cfg.steps < int(saved.get("steps", 0)):
        raise RunError(f"cannot resume {out} with fewer steps ({cfg.steps}) than it was started with ({saved['steps']})")
    return "resume"


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None  # killed before its first checkpoint: start over
    try:
        ckpt = torch.load(path, weights_only=True)
        _ = ckpt["step"], ckpt["model"], ckpt["optimizer"], ckpt["warm_start"]
    except Exception as err:
        raise RunError(f"corrupt checkpoint {path} ({type(err).__name__}); pass --overwrite to start over") from None
    return ckpt


@dataclass
class RunResult:
    out: Path
    config: TrainConfig
    warm_accuracy: float
    final_accuracy: float
    steps_done: int
    seconds: float


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
    out = Path(out)
    mode = check_run_dir(out, cfg, resume=resume, overwrite=overwrite)
    ckpt = _load_checkpoint(out / "checkpoint.pt") if mode == "resume" else None
    if mode == "overwrite":
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    regime = cfg.make_regime()
    t_start = time.perf_counter()
    try:
        policy = build_policy(cfg, cache_dir, log)
    except ModelUnavailable as err:
        raise RunError(str(err)) from None
    model = policy.model
    warm_info = policy.warm_info
    ref_params = {k: v.detach().clone() for k, v in model.named_parameters()} if cfg.kl_coef > 0 else None
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )

    if ckpt is None:
        start_step = 0
        for name in LOG_FILES:
            (out / name).unlink(missing_ok=True)
    else:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_step = int(ckpt["step"])
        warm_info = ckpt["warm_start"]
        for name in LOG_FILES:
            truncate_jsonl(out / name, lambda r: isinstance(r.get("step"), int) and r["step"] <= start_step)
    _atomic_write_text(
        out / "config.json",
        json.dumps({"config": asdict(cfg), "decomp_version": __version__, "schema_version": SCHEMA_VERSION}, indent=2),
    )

    metrics = JsonlWriter(out / "metrics.jsonl")
    decomp_log = JsonlWriter(out / "decomposition.jsonl")
    sweep_log = JsonlWriter(out / "sweeps.jsonl")
    curvature_log = JsonlWriter(out / "curvature.jsonl")
    warm_accuracy = float(warm_info["accuracy"])
    accuracy = warm_accuracy
    if start_step == 0:
        metrics.write({"step": 0, "regime": cfg.regime, "accuracy": warm_accuracy, "warm_start_steps": warm_info["steps"]})

    bar = None
    # a bar on a terminal; in a log (CI, nohup) a status line every 10% of the run instead
    line_every = max(1, cfg.steps // 10) if progress and not sys.stderr.isatty() else 0
    if progress and not line_every:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"{cfg.regime} s{cfg.seed}", unit="step", leave=True)
    n_updates = cfg.epochs * cfg.num_minibatches
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(_stream_seed(cfg.seed, step))
            batch, ref_logp, stats = rollout(policy, cfg, gen, ref_params)
            chunks = torch.randperm(batch.tokens.shape[0], generator=gen).chunk(cfg.num_minibatches)
            instrument = cfg.decomp_every > 0 and step % cfg.decomp_every == 0
            sums = {"pg_loss": 0.0, "mtp_loss": 0.0, "mtp_coef": 0.0, "kl": 0.0, "clip_fraction": 0.0}
            decomp_seconds = 0.0
            update_seconds = 0.0
            for update in range(n_updates):
                t_update = time.perf_counter()
                idx = chunks[update % cfg.num_minibatches]
                mb = batch.subset(idx)
                mask = mb.mask
                kwargs = {} if mb.attention_mask is None else {"attention_mask": mb.attention_mask}
                main, mtp = model(mb.tokens, detach=regime.detach, **kwargs)
                logp, mtp_logp, valid = aligned_logprobs(main, mtp, mb.tokens)
                pg = clipped_policy_loss(logp, mb.old_logp, mb.advantages, mask, cfg.clip_low, cfg.clip_high)
                loss = pg
                if ref_logp is not None:
                    kl = masked_mean(kl_k3(logp, ref_logp[idx]), mask)
                    loss = loss + cfg.kl_coef * kl
                    sums["kl"] += float(kl.detach())
                # response-shaped views: the reference estimator averages over them (padding included)
                r = mb.response
                terms = [
                    regime(r(m), r(logp), r(mb.old_logp), r(mb.advantages), r(mask & v))
                    for m, v in zip(mtp_logp, valid, strict=True)
                ]
                mtp_term = torch.stack([t.loss for t in terms]).mean()
                coef = sum(t.coef for t in terms) / len(terms)
                loss = loss + mtp_term
                if instrument and update == n_updates - 1:
                    t_dec = time.perf_counter()
                    result = instrument_update(
                        model, mb, opt, regime, coef=cfg.mtp_coef, active_coef=coef,
                        clip=(cfg.clip_low, cfg.clip_high), kl_coef=cfg.kl_coef,
                        ref_logp=None if ref_logp is None else ref_logp[idx],
                        directions=tuple(d.strip() for d in cfg.decomp_directions.split(",") if d.strip()),
                        sweep=bool(cfg.sweep_every) and step % cfg.sweep_every == 0,
                        curvature=bool(cfg.curvature_every) and step % cfg.curvature_every == 0,
                    )
                    where = {"step": step, "update": update, "regime": cfg.regime}
                    for record in result.decompositions:
                        decomp_log.write({**where, **record})
                    for record in result.sweeps:
                        sweep_log.write({**where, **record})
                    if result.curvature is not None:
                        curvature_log.write({**where, **result.curvature})
                    decomp_seconds += time.perf_counter() - t_dec
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    ratio = torch.exp(logp.detach() - mb.old_logp)
                    clipped = ((ratio < 1 - cfg.clip_low) | (ratio > 1 + cfg.clip_high)) & mask
                    sums["clip_fraction"] += float(clipped.sum() / mask.sum().clamp_min(1))
                sums["pg_loss"] += float(pg.detach())
                sums["mtp_loss"] += float(torch.stack([t.unit_loss.detach() for t in terms]).mean())
                sums["mtp_coef"] += coef
                update_seconds += time.perf_counter() - t_update
            record: dict[str, Any] = {"step": step, "regime": cfg.regime, **stats}
            record.update({k: v / n_updates for k, v in sums.items()})
            if step % cfg.eval_every == 0 or step == cfg.steps:
                accuracy = policy.accuracy()
                record["accuracy"] = accuracy
            record["decomp_seconds"] = decomp_seconds
            # one training update (forward, backward, AdamW) without the measurements: the unit
            # the decomposition's cost is compared with
            record["update_seconds"] = (update_seconds - decomp_seconds) / n_updates
            record["seconds"] = time.perf_counter() - t0
            metrics.write(record)
            if bar is not None:
                bar.set_postfix(reward=f"{stats['reward_mean']:.2f}", acc=f"{accuracy:.1%}", refresh=False)
                bar.update(1)
            elif line_every and (step % line_every == 0 or step == cfg.steps):
                log(f"{cfg.regime} seed {cfg.seed}: step {step}/{cfg.steps} reward {stats['reward_mean']:.2f} "
                    f"accuracy {accuracy:.1%}")
            if stop_after is not None and step >= stop_after:
                return RunResult(out, cfg, warm_accuracy, accuracy, step, time.perf_counter() - t_start)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _atomic_save(
                    {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "warm_start": warm_info},
                    out / "checkpoint.pt",
                )
    finally:
        for writer in (metrics, decomp_log, sweep_log, curvature_log):
            writer.close()
        if bar is not None:
            bar.close()

    if start_step >= cfg.steps:
        accuracy = policy.accuracy()
    result = RunResult(out, cfg, warm_accuracy, accuracy, cfg.steps, time.perf_counter() - t_start)
    _atomic_write_text(
        out / "summary.json",
        json.dumps(
            {"regime": cfg.regime, "seed": cfg.seed, "task": cfg.task, "steps": cfg.steps,
             "warm_accuracy": warm_accuracy, "final_accuracy": accuracy, "warm_start": warm_info},
            indent=2,
        ),
    )
    return result
