"""Reading run directories (the only input of the analysis commands).

A run directory holds ``config.json`` and the JSONL logs written by :mod:`decomp.training.loop` (or
``decomp_run.json`` in their place, as :mod:`decomp.integrations.trl` writes beside the model's
own ``config.json`` in a trainer's output directory). Given
paths that are run directories or folders containing them (one level down, as ``decomp compare``
writes), :func:`load_runs` returns :class:`Run` objects. Damaged input is skipped with a warning
naming the file and line: a truncated or non-JSON line, a record missing a required field, a run
whose schema version is not this one's. No usable run directory is an :class:`AnalysisError`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decomp.runlog import RUN_FILE, SCHEMA_VERSION, iter_jsonl

REQUIRED = {
    "metrics.jsonl": ("step", "regime"),
    "decomposition.jsonl": ("step", "direction", "correlation", "cross", "penalty", "predicted", "realized",
                            "lambda_star"),
    "sweeps.jsonl": ("step", "direction", "coefs", "realized", "quadratic"),
    "curvature.jsonl": ("step", "eigenvalue_max", "eigenvalue_min"),
}
ESTIMATORS = ("reference", "masked", "pooled", "jvp_masked", "jvp_pooled")


class AnalysisError(ValueError):
    """No usable input (the CLI prints it and exits with 2)."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    decompositions: list[dict[str, Any]] = field(default_factory=list)
    sweeps: list[dict[str, Any]] = field(default_factory=list)
    curvature: list[dict[str, Any]] = field(default_factory=list)

    @property
    def regime(self) -> str:
        return str(self.config.get("regime", "?"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def records(self, direction: str) -> list[dict[str, Any]]:
        return [r for r in self.decompositions if r["direction"] == direction]

    @property
    def warm_accuracy(self) -> float:
        first = [m for m in self.metrics if m["step"] == 0 and _finite(m.get("accuracy"))]
        return float(first[0]["accuracy"]) if first else math.nan

    @property
    def final_accuracy(self) -> float:
        evaluated = [m for m in self.metrics if m["step"] > 0 and _finite(m.get("accuracy"))]
        return float(evaluated[-1]["accuracy"]) if evaluated else math.nan


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _read(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    # strict JSON stores nan as null; iter_jsonl gives floats back
    return list(iter_jsonl(path, required=required)) if path.exists() else []


RUN_FILES = (RUN_FILE, "config.json")  # the first one present describes the run


def _run_file(p: Path) -> Path | None:
    return next((p / name for name in RUN_FILES if (p / name).is_file()), None)


def _run_dirs(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if _run_file(p) is not None:
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(c for c in p.iterdir() if c.is_dir() and _run_file(c) is not None))
        else:
            warnings.warn(f"{p}: not a run directory (no config.json), skipping", stacklevel=3)
    return found


def load_run(path: Path) -> Run | None:
    """One run directory, or ``None`` (with a warning) when it cannot be used."""
    config_path = _run_file(Path(path)) or Path(path) / "config.json"
    try:
        data = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        warnings.warn(f"{config_path}:1: unreadable config ({type(err).__name__}), skipping the run", stacklevel=2)
        return None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION or not isinstance(data.get("config"), dict):
        warnings.warn(
            f"{config_path}:1: schema version {version!r}, this decomp reads {SCHEMA_VERSION}; skipping the run",
            stacklevel=2,
        )
        return None
    run = Run(Path(path), data["config"])
    run.metrics = _read(run.path / "metrics.jsonl", REQUIRED["metrics.jsonl"])
    run.decompositions = _read(run.path / "decomposition.jsonl", REQUIRED["decomposition.jsonl"])
    run.sweeps = _read(run.path / "sweeps.jsonl", REQUIRED["sweeps.jsonl"])
    run.curvature = _read(run.path / "curvature.jsonl", REQUIRED["curvature.jsonl"])
    return run


def load_runs(paths: Iterable[Path | str]) -> list[Run]:
    """Every usable run under ``paths`` (run directories or their parents), sorted by regime and seed."""
    dirs = _run_dirs(Path(p) for p in paths)
    runs = [r for r in (load_run(d) for d in dirs) if r is not None]
    if not runs:
        raise AnalysisError("no run directories found (a run directory holds config.json)")
    order = {"detach": 0, "detach-inputs": 1, "ce": 2, "policy": 3, "occ": 4}
    return sorted(runs, key=lambda r: (order.get(r.regime, 9), r.regime, r.seed, str(r.path)))


def regimes_of(runs: list[Run]) -> list[str]:
    seen: list[str] = []
    for r in runs:
        if r.regime not in seen:
            seen.append(r.regime)
    return seen
