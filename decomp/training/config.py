"""Every hyperparameter of the reference run, with its default and meaning (:class:`TrainConfig`).

``TrainConfig`` extends the MTP and instrumentation settings shared with the TRL integration
(:mod:`decomp.config`), so ``--set KEY=VALUE`` reaches every field by one flat name and a run's
``config.json`` lists them all. ``decomp run --help-config`` prints the help texts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from decomp.config import InstrumentConfig, MTPConfig, field_help, option, parse_directions
from decomp.rules import rules_help
from decomp.models.tiny import ModelConfig
from decomp.training.tasks import TASKS, VOCAB_SIZE, Task
from decomp.training.warmstart import WarmStartConfig

TEXT_TASKS = ("add1", "add")
REWARDS = ("auto", "last_integer", "math")
POSITIVE_INTS = ("steps", "d_model", "n_layers", "n_heads", "d_mlp", "prompts_per_step", "group_size",
                 "num_minibatches", "epochs", "sft_batch_size", "sft_max_steps", "eval_every", "checkpoint_every", "mtp_warmup_steps")
# seeds are offset and combined with steps (decomp.rng.stream_seed) before they reach torch's
# 64-bit generators: a bound well inside that range
MAX_SEED = 2**62
NON_NEGATIVE = ("weight_decay", "clip_low", "clip_high", "kl_coef", "adam_eps")


class RunError(ValueError):
    """A problem with the user's input or run directory (the CLI prints it and exits with 2)."""


@dataclass(frozen=True)
class TrainConfig(InstrumentConfig, MTPConfig):
    """Everything that determines a run. Defaults: the reference run on ``add``."""

    # what to run
    label: str = option("", "the run's name in the analysis, e.g. occ-trust_region (default: the regime)")
    task: str = option("add", "builtin model: add | chain; Hugging Face model: add1 | add")
    seed: int = option(0, "seeds the warm start, rollouts and mini-batch order")
    steps: int = option(200, "RL steps (rollout batches)")
    model: str = option("builtin", "builtin | smollm2-135m | path of a local Hugging Face checkpoint folder")
    dataset: str = option("", "Hugging Face model: JSONL file of question/answer records (replaces task)")
    reward: str = option("auto", "Hugging Face model: last_integer | math | auto (math for datasets)")
    max_new_tokens: int = option(0, "Hugging Face model: response length limit (0: the task's default)")
    mtp_warmup_steps: int = option(30, "Hugging Face model: detached-CE steps warming up the MTP module")
    mtp_warmup_lr: float = option(1e-3, "Hugging Face model: AdamW learning rate of the MTP warm-up")
    # the built-in MTP transformer (vocabulary and length come from the task)
    d_model: int = option(64, "residual width")
    n_layers: int = option(2, "main transformer blocks")
    n_heads: int = option(4, "attention heads")
    d_mlp: int = option(256, "MLP hidden width")
    # rollouts
    prompts_per_step: int = option(16, "distinct prompts per rollout batch")
    group_size: int = option(8, "samples per prompt G (GRPO group)")
    # policy update
    lr: float = option(0.0, "AdamW learning rate; 0: the model family's default (builtin 3e-4, Hugging Face 1e-6)")
    beta1: float = option(0.9, "AdamW β₁")
    beta2: float = option(0.999, "AdamW β₂")
    adam_eps: float = option(1e-8, "AdamW ε")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    num_minibatches: int = option(2, "mini-batches per rollout batch")
    epochs: int = option(1, "passes over the rollout batch, each with a fresh partition (updates = epochs × "
                         "num_minibatches)")
    clip_low: float = option(0.2, "PPO clip: ratio ≥ 1 − clip_low")
    clip_high: float = option(0.2, "PPO clip: ratio ≤ 1 + clip_high")
    kl_coef: float = option(0.0, "weight of the k3 KL to the warm-start policy (0: off)")
    # warm start (supervised, cached)
    sft_lr: float = option(3e-3, "warm-start AdamW learning rate")
    sft_batch_size: int = option(128, "warm-start sequences per step")
    sft_mtp_coef: float = option(0.3, "warm-start MTP cross-entropy weight")
    sft_target_accuracy: float = option(0.3, "warm start lands at this held-out greedy accuracy (in (0, 1))")
    sft_target_tolerance: float = option(0.01, "warm start stops at the first evaluation within target ± this")
    sft_max_steps: int = option(5000, "warm start gives up (error) after this many steps")
    # sampling errors: on in the reference loop (a measurement without its error bar is not a result);
    # InstrumentConfig's default stays off for TRL, whose micro-batches carry no prompt groups
    group_errors: bool = option(True, "records carry the sampling errors of their terms and λ̂'s bootstrap "
                                "interval from the evaluation batch's prompt groups (one pass per split for every "
                                "direction: at the default held-out size no more than the HVPs it replaces, +11% "
                                "at 4× its groups, +32% at 16×; benchmarks/results.md)")
    # beyond one step (docs/method.md §3.6)
    horizon: int = option(1, "k: also judge each instrumented update's MTP term over k updates (it, then k−1 "
                          "RL-only updates on the loop's own next mini-batches, the same for every λ): λ̂_k, its "
                          "interval and the horizon-aware λ*_k in horizon.jsonl, written k−1 updates later; "
                          "1: the one-step measurement only. Cost per direction and split: 20–44 coefficients × "
                          "(k−1) backward passes (benchmarks/results.md)")
    horizon_directions: str = option("", "directions measured over the horizon (comma-separated; empty: "
                                     "decomp_directions)")
    horizon_accuracy: bool = option(False, "with horizon > 1: also the task's held-out greedy accuracy after the k "
                                    "updates at λ = 0, the applied λ, λ̂_k and the one-step λ̂ of the active "
                                    "direction (its first split's), each change to λ = 0 with its paired standard "
                                    "error over problems: 4 continuations and 4 greedy evaluations per "
                                    "instrumented update")
    # evaluation and checkpoints
    eval_every: int = option(10, "steps between held-out greedy evaluations (and at the end)")
    checkpoint_every: int = option(10, "steps between checkpoints (and at the end)")

    def validate(self) -> None:
        """Raise :class:`RunError` naming the first invalid field."""
        try:
            MTPConfig.validate(self)
            InstrumentConfig.validate(self)
        except ValueError as err:
            raise RunError(str(err)) from None
        self._validate_task()
        if not 0 <= self.seed < MAX_SEED:
            raise RunError(f"seed must be an integer in [0, 2^62), got {self.seed}")
        for name in POSITIVE_INTS:
            if getattr(self, name) < 1:
                raise RunError(f"{name} must be a positive integer, got {getattr(self, name)}")
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
        for name in NON_NEGATIVE:
            if not getattr(self, name) >= 0:
                raise RunError(f"{name} must be non-negative, got {getattr(self, name)}")
        self._validate_warm_start()
        if self.oracle_horizon > 1 and self.kl_coef > 0:
            raise RunError("oracle_horizon > 1 continues on lookahead batches without reference log-probs: "
                           "it needs kl_coef = 0")
        if self.horizon < 1:
            raise RunError(f"horizon must be a positive integer (1: one step), got {self.horizon}")
        if self.horizon > 1 and not self.decomp_every:
            raise RunError("horizon > 1 measures instrumented updates: set decomp_every > 0")
        if self.horizon_accuracy and self.horizon < 2:
            raise RunError("horizon_accuracy judges the accuracy k updates later: set horizon > 1")
        try:
            _ = self.horizon_direction_names
        except ValueError as err:
            raise RunError(str(err).replace("directions", "horizon_directions", 1)) from None
        if self.horizon_accuracy and "active" not in self.horizon_direction_names:
            raise RunError("horizon_accuracy judges the active direction: horizon_directions must include active")
        if self.d_model % self.n_heads:
            raise RunError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")

    def _validate_warm_start(self) -> None:
        # checked here, not after thousands of warm-start steps that cannot reach the band
        if not 0 < self.sft_target_accuracy < 1:
            raise RunError(f"sft_target_accuracy must lie in (0, 1) (a held-out accuracy), got {self.sft_target_accuracy}")
        if not 0 < self.sft_target_tolerance < min(self.sft_target_accuracy, 1 - self.sft_target_accuracy):
            raise RunError(f"sft_target_tolerance must be positive and keep target ± tolerance inside (0, 1), "
                           f"got {self.sft_target_tolerance}")

    def _validate_task(self) -> None:
        if self.model == "builtin":
            if self.task not in TASKS:
                raise RunError(f"unknown task {self.task!r}; valid tasks: {', '.join(TASKS)}")
            if self.dataset:
                raise RunError("--dataset needs a Hugging Face model (--model smollm2-135m or a checkpoint folder)")
        elif not self.dataset and self.task not in TEXT_TASKS:
            raise RunError(f"unknown task {self.task!r} for a Hugging Face model; valid tasks: {', '.join(TEXT_TASKS)} "
                           "(or --dataset FILE.jsonl)")
        if self.reward not in REWARDS:
            raise RunError(f"unknown reward {self.reward!r}; valid rewards: {', '.join(REWARDS)}")

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

    @property
    def horizon_direction_names(self) -> tuple[str, ...]:
        """``horizon_directions``, or the instrumented directions when it is empty."""
        return parse_directions(self.horizon_directions) if self.horizon_directions.strip() else self.directions

    @property
    def clip(self) -> tuple[float, float]:
        return (self.clip_low, self.clip_high)

    def warmstart_config(self) -> WarmStartConfig:
        return WarmStartConfig(
            lr=self.sft_lr, batch_size=self.sft_batch_size, mtp_coef=self.sft_mtp_coef,
            target_accuracy=self.sft_target_accuracy, tolerance=self.sft_target_tolerance, max_steps=self.sft_max_steps,
        )


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RunError(f"unknown config fields: {', '.join(unknown)}")
    return TrainConfig(**data)


def parse_value(key: str, raw: str) -> Any:
    """``raw`` converted to the type of ``TrainConfig`` field ``key`` (``RunError`` otherwise)."""
    if key not in FIELDS:
        raise RunError(f"unknown config field {key!r}; see `decomp run --help-config`")
    kind = type(FIELDS[key].default)
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise RunError(f"{key}: expected true or false, got {raw!r}")
        return lowered in ("true", "1", "yes")
    try:
        value = kind(raw)
    except ValueError:
        raise RunError(f"{key}: expected {kind.__name__}, got {raw!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise RunError(f"{key}: expected a finite number, got {raw!r}")
    return value


def config_help() -> str:
    """Every field with its default and help text (``decomp run --help-config``)."""
    lines = ["TrainConfig fields (set with --set KEY=VALUE):"]
    for name, default, text in field_help(TrainConfig):
        lines.append(f"  {name:<22} {default!s:<16} {text}")
    lines += ["", "Coefficient rules (occ_estimator: the estimator rules; cosine and oracle are their regimes' rules):",
              *rules_help()]
    return "\n".join(lines)
