"""A run directory: deciding what to do with one, and its checkpoint.

Layout (written by :func:`decomp.training.loop.train`)::

    config.json          the TrainConfig, decomp version and schema version
    metrics.jsonl        one record per step (step 0: the warm start's held-out accuracy)
    decomposition.jsonl  one record per instrumented update, direction and split
    sweeps.jsonl         realized ΔJ_MTP over a grid of λ, per direction
    curvature.jsonl      extreme Hessian eigenvalues of J
    checkpoint.pt        model + optimizer at the last checkpointed step (atomic replace)
    summary.json         written when the run completes
    .lock                held (``flock``) by the process writing the run

A folder that is not a decomp run is never written into; a folder holding another run is
replaced only with ``overwrite``, and only once the new run can start (the caller deletes it
after building the model); ``resume`` continues the same config (``steps`` may grow). A run
whose ``config.json`` is damaged, in a folder holding nothing but decomp's files, can be
replaced with ``overwrite``. One process at a time writes a run: :class:`RunLock`.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from decomp.runlog import BadJSON, parse_json
from decomp.training.config import RunError, TrainConfig

LOG_FILES = ("metrics.jsonl", "decomposition.jsonl", "sweeps.jsonl", "curvature.jsonl", "horizon.jsonl")
RUN_FILES = ("config.json", *LOG_FILES, "checkpoint.pt", "summary.json")
LOCK_FILE = ".lock"


def is_temporary(name: str) -> bool:
    """A temporary file of :func:`decomp.runlog.atomic_write` for one of the run's files (left
    behind by a process killed mid-write)."""
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES)


def remove_temporaries(out: Path) -> list[str]:
    """Delete the temporary files a killed writer left in ``out``; their names."""
    names = sorted(p.name for p in Path(out).iterdir() if is_temporary(p.name)) if Path(out).is_dir() else []
    for name in names:
        (Path(out) / name).unlink(missing_ok=True)
    return names


def _only_run_files(out: Path, names: tuple[str, ...] = RUN_FILES) -> bool:
    """Whether every entry of ``out`` is one of ``names``, the lock or a temporary file of decomp's."""
    return all(p.name in names or p.name == LOCK_FILE or is_temporary(p.name) for p in out.iterdir())


class RunLock:
    """An exclusive ``flock`` on ``out/.lock`` for as long as a process writes the run.

    The kernel drops the lock when its holder exits, however it exits, so a killed run never
    leaves a stale lock. ``acquire`` creates ``out`` if needed; ``release(remove_new=True)`` after a
    failed start removes the lock file and the folder again where this lock created them (the
    folder only if empty).
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self._file = None
        self._created_dir = self._created_file = False

    def acquire(self) -> RunLock:
        self._created_dir = not self.out.exists()
        self._created_file = not (self.out / LOCK_FILE).exists()
        self.out.mkdir(parents=True, exist_ok=True)
        f = open(self.out / LOCK_FILE, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RunError(_busy_message(self.out)) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def release(self, remove_new: bool = False) -> None:
        if self._file is None:
            return
        self._file.close()  # closing the last descriptor drops the flock
        self._file = None
        if remove_new and self._created_file:
            (self.out / LOCK_FILE).unlink(missing_ok=True)
        if remove_new and self._created_dir:
            try:
                self.out.rmdir()
            except OSError:
                pass  # not empty: something else was written there


def _busy_message(out: Path) -> str:
    try:
        pid = (out / LOCK_FILE).read_text(encoding="utf-8").strip() or "?"
    except OSError:
        pid = "?"
    return f"{out} is being written by another decomp process (pid {pid}); wait for it to end or choose another --out"


def check_not_locked(out: Path) -> None:
    """Raise :class:`RunError` if a live process holds ``out``'s lock (touching nothing)."""
    path = Path(out) / LOCK_FILE
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(_busy_message(Path(out))) from None


def _config_diff(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    # a field the saved run does not have was added by a later decomp: the run had its default
    a = {**asdict(TrainConfig()), **a}
    keys = sorted((set(a) | set(b)) - set(ignore))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


class DamagedConfig(Exception):
    """``config.json`` exists but cannot be read as JSON."""


def saved_run_config(config_path: Path) -> dict[str, Any] | None:
    """The TrainConfig dict of a decomp run's ``config.json``; ``None`` if it is JSON but not a
    decomp run's config. Raises :class:`DamagedConfig` if it cannot be read or parsed."""
    try:
        data = parse_json(config_path.read_bytes())
    except OSError as err:
        raise DamagedConfig(type(err).__name__) from None
    except BadJSON as err:
        raise DamagedConfig(str(err)) from None
    if isinstance(data, dict) and "schema_version" in data and isinstance(data.get("config"), dict):
        return data["config"]
    return None


def saved_steps(out: Path) -> int | None:
    """The ``steps`` of the run saved in ``out``, or ``None`` (no run there, or unreadable)."""
    try:
        saved = saved_run_config(Path(out) / "config.json")
    except DamagedConfig:
        return None
    steps = None if saved is None else saved.get("steps")
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def check_run_dir(out: Path, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                  check_lock: bool = True) -> str:
    """Decide what to do with ``out`` without touching it: ``"new"``, ``"resume"`` or ``"overwrite"``.

    Raises :class:`RunError` when the folder holds a different run (unless ``overwrite``), the
    same run (unless ``resume`` or ``overwrite``), or anything that is not a decomp run: files
    that decomp did not write are never replaced, ``--overwrite`` or not; and when another
    process holds the run's lock.
    """
    out = Path(out)
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a directory")
    if check_lock:  # not when the caller holds the lock itself
        check_not_locked(out)
    config_path = out / "config.json"
    if not config_path.exists():
        if out.exists() and not _only_run_files(out, names=()):
            raise RunError(f"{out} is not empty and holds no decomp run; choose an empty or new --out")
        return "new"
    try:
        saved = saved_run_config(config_path)
    except DamagedConfig as err:
        if not _only_run_files(out):
            raise RunError(f"{config_path} is unreadable ({err}) and {out} holds files decomp did not write; "
                           "choose another --out") from None
        if overwrite:
            return "overwrite"
        raise RunError(f"{config_path} is damaged ({err}), so the run cannot be resumed or compared; "
                       "pass --overwrite to start the run over (only decomp's files are deleted)") from None
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
