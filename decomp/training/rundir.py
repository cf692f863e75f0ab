"""A run directory: deciding what to do with one, and its checkpoint.

Layout (written by :func:`decomp.training.loop.train`)::

    config.json          the TrainConfig, decomp version and schema version
    metrics.jsonl        one record per step (step 0: the warm start's held-out accuracy)
    decomposition.jsonl  one record per instrumented update, direction and split
    sweeps.jsonl         realized ΔJ_MTP over a grid of λ, per direction
    curvature.jsonl      extreme Hessian eigenvalues of J
    checkpoint.pt        model + optimizer at the last checkpointed step (atomic replace)
    summary.json         written when the run completes

A folder that is not a decomp run is never written into; a folder holding another run is
replaced only with ``overwrite``; ``resume`` continues the same config (``steps`` may grow).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from decomp.training.config import RunError, TrainConfig

LOG_FILES = ("metrics.jsonl", "decomposition.jsonl", "sweeps.jsonl", "curvature.jsonl")
RUN_FILES = ("config.json", *LOG_FILES, "checkpoint.pt", "summary.json")


def _config_diff(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    keys = sorted((set(a) | set(b)) - set(ignore))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def saved_run_config(config_path: Path) -> dict[str, Any] | None:
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
    saved = saved_run_config(config_path)
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


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None  # killed before its first checkpoint: start over
    try:
        ckpt = torch.load(path, weights_only=True)
        _ = ckpt["step"], ckpt["model"], ckpt["optimizer"], ckpt["warm_start"]
    except Exception as err:
        raise RunError(f"corrupt checkpoint {path} ({type(err).__name__}); pass --overwrite to start over") from None
    return ckpt
