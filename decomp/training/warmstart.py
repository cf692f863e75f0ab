"""Supervised warm start: teach the tiny model the task's format up to a target accuracy.

RL needs a policy that is sometimes right (20–60% held-out accuracy), and the MTP module must
be trained before RL, as a pre-trained MTP layer would be. The warm start minimises
``CE_main + mtp_coef · CE_MTP`` on canonical answers (teacher forcing, AdamW) and stops at the
first evaluation where held-out greedy accuracy reaches ``target_accuracy``.

The result is cached under ``cache_dir`` by a hash of everything that determines it (model,
task, seed, these hyperparameters and ``WARMSTART_VERSION``), so every regime of a comparison,
and every later run, starts from the same weights without retraining.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from decomp.models.tiny import ModelConfig, MTPTransformer
from decomp.objectives import aligned_logprobs
from decomp.rl import cross_entropy_loss, generate
from decomp.runlog import atomic_write
from decomp.training.tasks import EOS, PAD, Task

WARMSTART_VERSION = 1  # bump when the warm-start procedure changes


class WarmStartError(RuntimeError):
    """The warm start did not reach its target accuracy."""


@dataclass(frozen=True)
class WarmStartConfig:
    lr: float = 3e-3  # AdamW learning rate
    batch_size: int = 128  # sequences per step
    mtp_coef: float = 0.3  # MTP CE weight (DeepSeek-V3's early pre-training value)
    target_accuracy: float = 0.3  # stop at the first evaluation at or above this
    eval_every: int = 25  # steps between held-out evaluations
    max_steps: int = 5000  # give up (error) if the target is not reached by then


def default_cache_dir() -> Path:
    """``$DECOMP_CACHE``, else ``$XDG_CACHE_HOME/decomp``, else ``~/.cache/decomp``."""
    if os.environ.get("DECOMP_CACHE"):
        return Path(os.environ["DECOMP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "decomp"


@torch.no_grad()
def held_out_accuracy(model: MTPTransformer, task: Task, problems: list | None = None) -> float:
    """Greedy-decoding accuracy on the task's held-out problems (or on ``problems``)."""
    problems = task.held_out if problems is None else problems
    was_training = model.training
    model.eval()
    responses = generate(model, task.prompt_ids(problems), task.max_response_len, eos_id=EOS, pad_id=PAD, greedy=True)
    model.train(was_training)
    return float(task.rewards(responses, problems).mean())


def _cache_key(model_cfg: ModelConfig, task: Task, seed: int, cfg: WarmStartConfig) -> str:
    blob = json.dumps(
        {"model": asdict(model_cfg), "task": task.name, "seed": seed, "cfg": asdict(cfg), "v": WARMSTART_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _train(model_cfg: ModelConfig, task: Task, seed: int, cfg: WarmStartConfig) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MTPTransformer(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    train = task.train
    prompts, targets = task.prompt_ids(train), task.target_ids(train)
    tokens_all = torch.cat([prompts, targets], dim=1)
    P = prompts.shape[1]
    start = time.perf_counter()
    accuracy = held_out_accuracy(model, task)
    step = 0
    while accuracy < cfg.target_accuracy:
        if step >= cfg.max_steps:
            raise WarmStartError(
                f"warm start reached only {accuracy:.1%} held-out accuracy in {step} steps "
                f"(target {cfg.target_accuracy:.0%}); raise max_steps or lr"
            )
        model.train()
        for _ in range(cfg.eval_every):
            idx = torch.randint(0, len(train), (cfg.batch_size,), generator=gen)
            tokens = tokens_all[idx]
            # aligned index j is token j+1: answer tokens (with <eos>, without padding)
            mask = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
            mask[:, P - 1 :] = tokens[:, P:] != PAD
            main, mtp = model(tokens)
            logp, mtp_logp, valid = aligned_logprobs(main, mtp, tokens)
            loss = cross_entropy_loss(logp, mask)
            for m, v in zip(mtp_logp, valid, strict=True):
                loss = loss + cfg.mtp_coef / len(mtp_logp) * cross_entropy_loss(m, mask & v)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        accuracy = held_out_accuracy(model, task)
    model.eval()
    info = {"steps": step, "accuracy": accuracy, "seconds": time.perf_counter() - start}
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
