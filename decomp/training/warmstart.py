"""Supervised warm start: teach the tiny model the task's format up to a target accuracy.

RL needs a policy that is sometimes right (20–60% held-out accuracy), and the MTP module must
be trained before RL, as a pre-trained MTP layer would be. The warm start minimises
``CE_main + mtp_coef · CE_MTP`` on canonical answers (teacher forcing, AdamW) and stops at the
first evaluation whose held-out greedy accuracy lies in ``target_accuracy ± tolerance``, so every
seed starts RL from a policy of the same quality (stopping at the first evaluation *above* the
target landed anywhere between 30% and 65%: accuracy jumps by tens of points between sparse
evaluations, and where it lands moved with the CPU's float rounding).

To land in the band, evaluations become dense (after every step) once the accuracy is within
``approach`` of it, and an evaluation above the band restores the last state evaluated below it
(model and optimizer) and halves the learning rate. Landing in the band is therefore a property
of the procedure, not of the trajectory: another CPU may take other steps but stops in the same
band (or raises :class:`WarmStartError` after ``max_steps``).

The result is cached under ``cache_dir`` by a hash of everything that determines it (model,
task, seed, these hyperparameters and ``WARMSTART_VERSION``), so every regime of a comparison,
and every later run, starts from the same weights without retraining.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from decomp.models.tiny import ModelConfig, MTPTransformer
from decomp.objectives import aligned_logprobs
from decomp.rl import cross_entropy_loss, generate
from decomp.runlog import atomic_write
from decomp.training.tasks import EOS, PAD, Task

WARMSTART_VERSION = 2  # bump when the warm-start procedure changes


class WarmStartError(RuntimeError):
    """The warm start did not reach its target accuracy."""


@dataclass(frozen=True)
class WarmStartConfig:
    lr: float = 3e-3  # AdamW learning rate
    batch_size: int = 128  # sequences per step
    mtp_coef: float = 0.3  # MTP CE weight (DeepSeek-V3's early pre-training value)
    target_accuracy: float = 0.3  # held-out greedy accuracy to land at
    tolerance: float = 0.01  # stop at the first evaluation within target ± tolerance
    approach: float = 0.1  # evaluate after every step once within this of the band
    eval_every: int = 25  # steps between held-out evaluations further away
    max_steps: int = 5000  # give up (error) if the band is not reached by then (discarded steps count)


def default_cache_dir() -> Path:
    """``$DECOMP_CACHE``, else ``$XDG_CACHE_HOME/decomp``, else ``~/.cache/decomp``."""
    if os.environ.get("DECOMP_CACHE"):
        return Path(os.environ["DECOMP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "decomp"


@torch.no_grad()
def held_out_rewards(model: MTPTransformer, task: Task, problems: list | None = None) -> Tensor:
    """Each held-out problem's reward (1 correct, 0 not) under greedy decoding (``problems``:
    instead of the task's held-out problems)."""
    problems = task.held_out if problems is None else problems
    was_training = model.training
    model.eval()
    responses = generate(model, task.prompt_ids(problems), task.max_response_len, eos_id=EOS, pad_id=PAD, greedy=True)
    model.train(was_training)
    return task.rewards(responses, problems)


def held_out_accuracy(model: MTPTransformer, task: Task, problems: list | None = None) -> float:
    """Greedy-decoding accuracy on the task's held-out problems (or on ``problems``)."""
    return float(held_out_rewards(model, task, problems).mean())


def _cache_key(model_cfg: ModelConfig, task: Task, seed: int, cfg: WarmStartConfig) -> str:
    blob = json.dumps(
        {"model": asdict(model_cfg), "task": task.name, "seed": seed, "cfg": asdict(cfg), "v": WARMSTART_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _snapshot(model: MTPTransformer, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _restore(model: MTPTransformer, opt: torch.optim.Optimizer, snap: tuple[dict, dict], lr: float) -> None:
    model.load_state_dict(snap[0])
    opt.load_state_dict(snap[1])
    for group in opt.param_groups:
        group["lr"] = lr


@dataclass
class _Batches:
    """Random mini-batches of the training pool's canonical answers, from one seeded stream."""

    task: Task
    batch_size: int
    gen: torch.Generator

    def __post_init__(self) -> None:
        prompts, targets = self.task.prompt_ids(self.task.train), self.task.target_ids(self.task.train)
        self.tokens = torch.cat([prompts, targets], dim=1)
        self.prompt_len = prompts.shape[1]

    def next(self) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, self.tokens.shape[0], (self.batch_size,), generator=self.gen)
        tokens = self.tokens[idx]
        # aligned index j is token j+1: answer tokens (with <eos>, without padding)
        mask = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
        mask[:, self.prompt_len - 1 :] = tokens[:, self.prompt_len :] != PAD
        return tokens, mask


def _supervised_steps(model: MTPTransformer, opt: torch.optim.Optimizer, batches: _Batches, n: int,
                      mtp_coef: float) -> None:
    """``n`` AdamW steps on ``CE_main + mtp_coef · CE_MTP`` (teacher forcing)."""
    model.train()
    for _ in range(n):
        tokens, mask = batches.next()
        main, mtp = model(tokens)
        logp, mtp_logp, valid = aligned_logprobs(main, mtp, tokens)
        loss = cross_entropy_loss(logp, mask)
        for m, v in zip(mtp_logp, valid, strict=True):
            loss = loss + mtp_coef / len(mtp_logp) * cross_entropy_loss(m, mask & v)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _train(model_cfg: ModelConfig, task: Task, seed: int, cfg: WarmStartConfig) -> tuple[dict, dict]:
    """Train until a held-out evaluation lands in ``target ± tolerance`` (module docstring).

    Below the band the last evaluated state is kept; an evaluation above it restores that state,
    halves the learning rate and evaluates after every step from then on, so each retry moves
    the accuracy less per evaluation. Within ``approach`` of the band evaluations are also dense.
    """
    torch.manual_seed(seed)
    model = MTPTransformer(model_cfg)
    lr = cfg.lr
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = _Batches(task, cfg.batch_size, torch.Generator().manual_seed(seed))
    low, high = cfg.target_accuracy - cfg.tolerance, cfg.target_accuracy + cfg.tolerance
    start = time.perf_counter()
    accuracy, steps, evaluations, rollbacks, dense = held_out_accuracy(model, task), 0, 1, 0, False
    below = _snapshot(model, opt)
    while not low <= accuracy <= high:
        if steps >= cfg.max_steps:
            raise WarmStartError(
                f"warm start did not land in {low:.1%}–{high:.1%} held-out accuracy within {steps} steps "
                f"(last {accuracy:.1%}, {rollbacks} rollbacks); raise sft_max_steps or sft_target_tolerance")
        n = 1 if dense else min(cfg.eval_every, cfg.max_steps - steps)
        _supervised_steps(model, opt, batches, n, cfg.mtp_coef)
        steps, evaluations = steps + n, evaluations + 1
        accuracy = held_out_accuracy(model, task)
        if accuracy < low:
            below = _snapshot(model, opt)
            dense = dense or accuracy >= low - cfg.approach
        elif accuracy > high:  # overshot the band: back to the last state below it, slower
            lr, rollbacks, dense = lr / 2, rollbacks + 1, True
            _restore(model, opt, below, lr)
    info = {"steps": steps, "accuracy": accuracy, "seconds": time.perf_counter() - start,
            "evaluations": evaluations, "rollbacks": rollbacks, "final_lr": lr}
    return model.state_dict(), info


def warm_start(
    model_cfg: ModelConfig,
    task: Task,
    seed: int,
    cfg: WarmStartConfig = WarmStartConfig(),
    cache_dir: Path | None = None,
    log=print,
) -> tuple[dict, dict]:
    """Warm-start weights and ``{"steps", "accuracy", "seconds", "cached", "path"}``.

    Loads them from the cache when present; otherwise trains and stores them (atomically, so
    parallel runs of one comparison never read a half-written file).
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    path = cache_dir / f"warmstart-{task.name}-{_cache_key(model_cfg, task, seed, cfg)}.pt"
    if path.exists():
        try:
            blob = torch.load(path, weights_only=True)
            return blob["state"], {**blob["info"], "cached": True, "path": str(path)}
        except Exception:
            log(f"warm-start cache {path} is unreadable; retraining it")
    log(f"warm start: training to {cfg.target_accuracy:.0%} held-out accuracy on {task.name!r} (seed {seed})")
    state, info = _train(model_cfg, task, seed, cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save({"state": state, "info": info}, tmp))
    log(f"warm start: {info['accuracy']:.1%} after {info['steps']} steps ({info['seconds']:.1f} s), cached")
    return state, {**info, "cached": False, "path": str(path)}
