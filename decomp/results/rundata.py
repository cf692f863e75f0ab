"""Reading run directories (the only input of the analysis commands).

A run directory holds ``config.json`` and the JSONL logs written by :mod:`decomp.training.loop` (or
``decomp_run.json`` in their place, as :mod:`decomp.integrations.trl` writes beside the model's
own ``config.json`` in a trainer's output directory). Given
paths that are run directories or folders containing them (one level down, as ``decomp compare``
writes), :func:`load_runs` returns :class:`Run` objects. A run directory is untrusted input:
damaged input is skipped with a warning naming the file and line, never a crash. A log line that
is truncated, not JSON, not UTF-8 or nested too deeply, a record missing a required field or
holding one of the wrong type (``FIELDS``: a ``step`` that is not a non-negative integer, a
``correlation`` that is a string, a sweep whose lists differ in length, ...) is skipped; a run is
skipped when its ``config.json`` cannot be read, its schema version is one this decomp cannot
read (``READABLE_SCHEMAS``: version 1, before ``split`` and the realized optimum, and the current
one) or a value the analysis reads from its config has the wrong type (:func:`config_problem`).
No usable run directory is an :class:`AnalysisError`.

Decomposition records are read as they are; fields added by newer runs (``split``, ``same_as``,
``lambda_hat``, ``gain_hat``, ``gain_<estimator>``, ...) are absent from older ones and read as
absent. Two rules make every statistic count each measurement once:

- a record's split is its ``split`` field, ``"train"`` when there is none (:func:`split_of`);
- a shadow direction identical to the active one (the ``ce`` direction of a ``ce`` run) is a
  copy of the ``active`` record, marked ``same_as: "active"``; older runs are recognised by
  ``seconds == 0.0`` and every numeric field equal to the active record of the same step,
  update and split (:func:`copies_of_active`). A copy stands for its direction in a
  per-direction statistic; statistics over every direction leave it out
  (:meth:`Run.unique_records`).

``horizon.jsonl`` (the ``k``-step records of ``horizon`` > 1, :mod:`decomp.training.horizons`) is
read the same way into :attr:`Run.horizons` (``FIELDS["horizon.jsonl"]``: a damaged line or a
record with a field of the wrong type is skipped with a warning), with the same two rules
(:meth:`Run.horizon_records`, :meth:`Run.unique_horizon_records`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decomp.config import InstrumentConfig, MTPConfig
from decomp.results.stats import finite
from decomp.rules import estimator_rules
from decomp.vocabulary import TERMS
from decomp.runlog import RUN_FILE, SCHEMA_VERSION, BadJSON, iter_jsonl, parse_json

REQUIRED = {
    "metrics.jsonl": ("step", "regime"),
    "decomposition.jsonl": ("step", "direction", *TERMS, "predicted", "realized",
                            "lambda_star"),
    "sweeps.jsonl": ("step", "direction", "coefs", "realized", "quadratic"),
    "curvature.jsonl": ("step", "eigenvalue_max", "eigenvalue_min"),
    "horizon.jsonl": ("step", "direction", "horizon", "lambda_hat_k"),
}
# the preferred display order; the estimators of a record set are every coef_<name> field present
READABLE_SCHEMAS = tuple(range(1, SCHEMA_VERSION + 1))  # older records lack the newer fields: read as absent
FINAL_EVALUATIONS = 5  # held-out evaluations averaged into a run's final accuracy


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
    horizons: list[dict[str, Any]] = field(default_factory=list)  # horizon.jsonl: k-step records

    @property
    def regime(self) -> str:
        """The run's name in the analysis: its ``label`` (e.g. ``occ-trust_region``: one regime,
        another estimator), else its regime."""
        return str(self.config.get("label") or self.config.get("regime", "?"))

    @property
    def task(self) -> str:
        return str(self.config.get("task", "?"))

    @property
    def seed(self) -> int:
        """The config's ``seed``, 0 when absent or null (:func:`config_problem` checked it is an
        integer)."""
        seed = self.config.get("seed")
        return 0 if seed is None else int(seed)

    def records(self, direction: str, split: str | None = None) -> list[dict[str, Any]]:
        """The records of ``direction`` (of one ``split`` when given); copies of the active
        record stand for their direction and are included."""
        return [r for r in self.decompositions
                if r["direction"] == direction and (split is None or split_of(r) == split)]

    def unique_records(self, split: str | None = None) -> list[dict[str, Any]]:
        """Every decomposition record (of one ``split`` when given) except the copies of the
        active record: each measurement once."""
        copies = copies_of_active(self.decompositions)
        return [r for i, r in enumerate(self.decompositions)
                if i not in copies and (split is None or split_of(r) == split)]

    def copies(self, direction: str) -> int:
        """How many records of ``direction`` are copies of the active record."""
        return sum(1 for i in copies_of_active(self.decompositions) if self.decompositions[i]["direction"] == direction)

    def preferred_split(self, direction: str) -> str:
        """``heldout`` when the run has held-out records of ``direction``, else ``train``."""
        return "heldout" if self.records(direction, "heldout") else "train"

    def horizon_records(self, direction: str, split: str | None = None) -> list[dict[str, Any]]:
        """The ``horizon.jsonl`` records of ``direction`` (of one ``split`` when given); a copy of
        the active record (``same_as: "active"``) stands for its direction, as in :meth:`records`.
        A run of regime ``direction`` that measured only its active direction over the horizon
        (``horizon_directions = active``) gives its active records: they are that direction's."""
        def of(d: str) -> list[dict[str, Any]]:
            return [r for r in self.horizons if r["direction"] == d and (split is None or split_of(r) == split)]
        own = of(direction)
        return own if own or direction != self.config.get("regime") else of("active")

    def unique_horizon_records(self, split: str | None = None) -> list[dict[str, Any]]:
        """Every ``horizon.jsonl`` record (of one ``split`` when given) except the copies of the
        active record: each ``k``-step measurement once."""
        copies = copies_of_active(self.horizons)
        return [r for i, r in enumerate(self.horizons) if i not in copies and (split is None or split_of(r) == split)]

    @property
    def evaluations(self) -> list[float]:
        """Held-out accuracies after the warm start (step > 0), in step order."""
        evaluated = sorted((m for m in self.metrics if m["step"] > 0 and finite(m.get("accuracy"))),
                           key=lambda m: m["step"])
        return [float(m["accuracy"]) for m in evaluated]

    @property
    def warm_accuracy(self) -> float:
        first = [m for m in self.metrics if m["step"] == 0 and finite(m.get("accuracy"))]
        return float(first[0]["accuracy"]) if first else math.nan

    @property
    def final_accuracy(self) -> float:
        """The last held-out evaluation (see :meth:`final_accuracy_mean` for the summary the
        claims use)."""
        evaluated = self.evaluations
        return evaluated[-1] if evaluated else math.nan

    def final_accuracy_mean(self, k: int = FINAL_EVALUATIONS) -> float:
        """Mean of the last ``k`` held-out evaluations (all of them when there are fewer): one
        evaluation on a fixed set is noisy, and the last ``k`` share the end of training."""
        evaluated = self.evaluations[-k:]
        return float(sum(evaluated) / len(evaluated)) if evaluated else math.nan


SHARED_TRAJECTORY = ("detach", "frozen", "distill")  # regimes whose policy is detach's, update by update
COLLAPSE_FRACTION = 0.25  # a run whose final accuracy is at most this share of its warm start's has collapsed


def collapsed(run: Run) -> bool:
    """Whether the run's policy collapsed: its final accuracy (:meth:`Run.final_accuracy_mean`)
    is at most ``COLLAPSE_FRACTION`` × its warm-start accuracy (both finite, the warm start's
    > 0). A collapsed policy no longer follows an arm of its own: its runs are not independent
    evidence about the arm."""
    warm, final = run.warm_accuracy, run.final_accuracy_mean()
    return finite(warm) and finite(final) and warm > 0 and final <= COLLAPSE_FRACTION * warm


# settings that decide only what is measured, evaluated, saved or called, and for how long: two
# runs that differ in nothing else train one policy (the measurements draw their own streams)
MEASUREMENT_ONLY = frozenset({f.name for f in dataclasses.fields(InstrumentConfig)} | {
    "horizon", "horizon_directions", "horizon_accuracy", "eval_every", "checkpoint_every", "label", "steps"})
RULE_READS = {"oracle": frozenset({"heldout_groups"})}  # ... except where a regime's rule reads one
_DEFAULTS = {f.name: f.default for cls in (MTPConfig, InstrumentConfig) for f in dataclasses.fields(cls)}


def trajectory_key(run: Run) -> str:
    """``"<task>/seed<seed>/<regime>/<digest>"``, the digest over the run's settings that shape its
    policy (all but :data:`MEASUREMENT_ONLY`; a setting at its default counts as absent, so a run
    written before the setting existed keys as one written after)."""
    regime = run.config.get("regime")
    kept = {k: v for k, v in run.config.items()
            if (k not in MEASUREMENT_ONLY or k in RULE_READS.get(str(regime), ())) and not (k in _DEFAULTS
                                                                                        and v == _DEFAULTS[k])}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{run.task}/seed{run.seed}/{regime}/{digest}"


def cluster_of(run: Run) -> str:
    """The run's cluster, the unit the analysis resamples: runs that share one policy trajectory
    — the ``SHARED_TRAJECTORY`` regimes of one task and seed (``frozen`` and ``distill`` leave the
    policy exactly as ``detach``), and any :func:`collapsed` run of that seed — are one cluster,
    ``"<task>/seed<seed>"``; so are runs that differ only in what they measure
    (:func:`trajectory_key`, e.g. one with the noise ceiling or a horizon and one without); every
    other run is its own cluster."""
    if run.config.get("regime") in SHARED_TRAJECTORY or collapsed(run):
        return f"{run.task}/seed{run.seed}"
    return trajectory_key(run)


def split_of(record: dict[str, Any]) -> str:
    """The record's split: its ``split`` field, ``"train"`` when absent or empty."""
    split = record.get("split")
    return split if isinstance(split, str) and split else "train"


def _key(record: dict[str, Any]) -> tuple[Any, ...]:
    return record.get("step"), record.get("update"), split_of(record)


def _same_numbers(copy: dict[str, Any], active: dict[str, Any]) -> bool:
    """Every numeric field of ``copy`` but the timings (``*seconds``) equals ``active``'s (nan
    equals nan)."""
    for k, v in copy.items():
        if k.endswith("seconds") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        w = active.get(k)
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            return False
        if not (v == w or (math.isnan(v) and math.isnan(w))):
            return False
    return True


def is_copy_of(record: dict[str, Any], active: dict[str, Any] | None) -> bool:
    """Whether ``record`` (a shadow direction) is the copy of the active record ``active`` of
    its step, update and split: by its ``same_as`` field when present, else by ``seconds == 0``
    and identical numbers."""
    if record.get("direction") == "active":
        return False
    same_as = record.get("same_as")
    if isinstance(same_as, str):
        return same_as == "active"
    if active is None or record.get("seconds") != 0.0:
        return False
    return _same_numbers(record, active)


def copies_of_active(records: list[dict[str, Any]]) -> set[int]:
    """Indices in ``records`` of the copies of an active record (:func:`is_copy_of`)."""
    active = {_key(r): r for r in records if r.get("direction") == "active"}
    return {i for i, r in enumerate(records) if is_copy_of(r, active.get(_key(r)))}


def interior_optimum(record: dict[str, Any]) -> bool:
    """Whether the record's ``λ̂`` is finite and an interior maximum (``lambda_hat_reason`` empty
    or absent); at the search bound its magnitude is the bound's, only its sign is informative."""
    reason = record.get("lambda_hat_reason")
    return finite(record.get("lambda_hat")) and (not isinstance(reason, str) or reason == "")


def estimator_names(records: Iterable[dict[str, Any]]) -> list[str]:
    """Every estimator with a ``coef_<name>`` field in ``records``: the registered estimator rules
    (:func:`decomp.rules.estimator_rules`) in their order, then the others sorted."""
    found = {k[len("coef_"):] for r in records for k in r if k.startswith("coef_") and len(k) > len("coef_")}
    known = list(estimator_rules())
    return [e for e in known if e in found] + sorted(found - set(known))


def realized_efficiency(record: dict[str, Any], estimator: str) -> float:
    """``gain_E / gain_hat`` of a record: its ``efficiency_E`` when the record carries the
    realized optimum (``gain_hat``), else ``nan`` (older records' ``efficiency_E`` is the
    quadratic model's, :func:`model_efficiency`)."""
    if "gain_hat" not in record:
        return math.nan
    eff = record.get(f"efficiency_{estimator}")
    if finite(eff):
        return float(eff)
    gain, best = record.get(f"gain_{estimator}"), record.get("gain_hat")
    return float(gain) / float(best) if finite(gain) and finite(best) and best != 0 else math.nan


def model_efficiency(record: dict[str, Any], estimator: str) -> float:
    """The quadratic model's ``gain(λ_est)/gain(λ*)``: ``model_efficiency_E``, or in records
    without a realized optimum, ``efficiency_E``."""
    key = f"model_efficiency_{estimator}" if "gain_hat" in record else f"efficiency_{estimator}"
    value = record.get(key)
    return float(value) if finite(value) else math.nan


def is_number(value: Any) -> bool:
    """A JSON number (``nan`` and ``±inf`` included, a boolean not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_count(value: Any) -> bool:
    """A non-negative integer (:func:`decomp.runlog.parse_json` reads larger ones than ±2**63
    as floats)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_grid(value: Any) -> bool:
    """A non-empty list of finite numbers (the ``λ`` of a sweep)."""
    return isinstance(value, list) and bool(value) and all(is_number(v) and math.isfinite(v) for v in value)


def _is_points(value: Any) -> bool:
    """A non-empty list of finite numbers or ``null`` (an undefined ``ΔJ``)."""
    return isinstance(value, list) and bool(value) and _is_points_or_empty(value)


def _is_points_or_empty(value: Any) -> bool:
    """A list, possibly empty, of finite numbers or ``null``."""
    return isinstance(value, list) and all(v is None or (is_number(v) and math.isfinite(v)) for v in value)


Kind = tuple[Callable[[Any], bool], str]  # a test of a field's value, and what it expects
NUMBER: Kind = (is_number, "a number")
COUNT: Kind = (is_count, "a non-negative integer")
TEXT: Kind = (lambda v: isinstance(v, str), "a string")
GRID: Kind = (_is_grid, "a non-empty list of finite numbers")
POINTS: Kind = (_is_points, "a non-empty list of finite numbers or nulls")
_TERMS = (*TERMS, "predicted", "realized", "lambda_star")


def _is_numbers(value: Any) -> bool:
    """A list of finite numbers, possibly empty (the ``λ`` a search evaluated)."""
    return isinstance(value, list) and all(is_number(v) and math.isfinite(v) for v in value)


def _is_interval(value: Any) -> bool:
    """``[lo, hi]``: two numbers or ``null`` (no interval)."""
    return isinstance(value, list) and len(value) == 2 and all(v is None or is_number(v) for v in value)


NUMBERS: Kind = (_is_numbers, "a list of finite numbers")
INTERVAL: Kind = (_is_interval, "a list of two numbers or nulls")
SOME_POINTS: Kind = (_is_points_or_empty, "a list of finite numbers or nulls")
_HORIZON_NUMBERS = ("lambda_hat_k", "gain_hat_k", "gain_k_coef", "gain_k_lambda_star_k", "gain_k_lambda_hat",
                    "lambda_star_k", "coef", "unit_displacement_k_norm", "unit_displacement_first_norm")
# per file, the type of every field the analysis reads unguarded (the other fields pass through
# `finite`, or are never read): a record holding one of another type is skipped, as damaged
FIELDS: dict[str, dict[str, Kind]] = {
    "metrics.jsonl": {"step": COUNT},
    "decomposition.jsonl": {"step": COUNT, "update": COUNT, "direction": TEXT, **dict.fromkeys(_TERMS, NUMBER)},
    "sweeps.jsonl": {"step": COUNT, "direction": TEXT, "coefs": GRID, "realized": POINTS, "quadratic": POINTS},
    "curvature.jsonl": {"step": COUNT, "eigenvalue_max": NUMBER, "eigenvalue_min": NUMBER},
    "horizon.jsonl": {"step": COUNT, "update": COUNT, "completed_step": COUNT, "horizon": COUNT, "direction": TEXT,
                      "lambda_hat_k_reason": TEXT, **dict.fromkeys(_HORIZON_NUMBERS, NUMBER),
                      "lambda_hat_k_interval": INTERVAL, "coefs_k": NUMBERS, "gains_k": SOME_POINTS},
}


def describe(value: Any) -> str:
    """``value`` for a warning: a number itself, anything else by its JSON type (a string or a
    list may be huge, or nested too deeply to print)."""
    if is_number(value):
        return repr(value)
    if isinstance(value, list) and not value:
        return "an empty list"
    names = {str: "a string", list: "a list", dict: "an object", bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def field_problem(record: dict[str, Any], kinds: dict[str, Kind]) -> str | None:
    """The first field of ``record`` (among ``kinds``, those present) whose value has the wrong
    type, as the rest of a warning after "skipping "; ``None`` when every one is right."""
    for key, (ok, expected) in kinds.items():
        if key in record and not ok(record[key]):
            return f"a record whose {key} is {describe(record[key])}, not {expected}"
    return None


def sweep_problem(record: dict[str, Any]) -> str | None:
    """:func:`field_problem` of a sweep, then whether its ``coefs``, ``realized`` and
    ``quadratic`` have one value per coefficient (the figure pairs them)."""
    problem = field_problem(record, FIELDS["sweeps.jsonl"])
    if problem is None and not len(record["coefs"]) == len(record["realized"]) == len(record["quadratic"]):
        problem = "a sweep whose coefs, realized and quadratic differ in length"
    return problem


def horizon_problem(record: dict[str, Any]) -> str | None:
    """:func:`field_problem` of a ``horizon.jsonl`` record, then whether its ``coefs_k`` and
    ``gains_k`` (the evaluated grid) have one gain per coefficient."""
    problem = field_problem(record, FIELDS["horizon.jsonl"])
    if problem is None and "coefs_k" in record and len(record["coefs_k"]) != len(record.get("gains_k", [])):
        problem = "a horizon record whose coefs_k and gains_k differ in length"
    return problem


def _check(name: str) -> Callable[[dict[str, Any]], str | None]:
    if name == "sweeps.jsonl":
        return sweep_problem
    if name == "horizon.jsonl":
        return horizon_problem
    return lambda record: field_problem(record, FIELDS[name])


def _read(path: Path) -> list[dict[str, Any]]:
    """The valid records of one of a run's logs (none when it is absent, or unreadable: with a
    warning); strict JSON stores nan as null, and iter_jsonl gives floats back."""
    if not path.exists():
        return []
    try:
        return list(iter_jsonl(path, required=REQUIRED[path.name], check=_check(path.name)))
    except OSError as err:  # a folder in the file's place, no permission, ...
        warnings.warn(f"{path}:1: unreadable ({type(err).__name__}), skipping the file", stacklevel=3)
        return []


RUN_FILES = (RUN_FILE, "config.json")  # the first one present describes the run
NAMES = ("label", "regime", "task")  # the config's names of the run: strings, in tables and figures


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
    return _once_each(found)


def _once_each(dirs: list[Path]) -> list[Path]:
    """``dirs`` without repeats of one folder (given twice, or once itself and once through its
    parent, or through a link): a run counts once, whatever path names it."""
    seen: set[Path] = set()
    out = []
    for d in dirs:
        key = d.resolve()
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def config_problem(config: dict[str, Any]) -> str | None:
    """Why the values the analysis reads from a run's ``config`` are unusable, or ``None``: the
    ``seed`` pairs runs and names them, it must be an integer (absent or null: 0; ``1e400`` reads
    as inf and ``int(inf)`` raises), and ``label``, ``regime`` and ``task`` strings (or absent)."""
    seed = config.get("seed")
    if seed is not None and not (is_number(seed) and float(seed).is_integer()):
        return f"seed is {describe(seed)}, not an integer"
    for key in NAMES:
        value = config.get(key)
        if value is not None and not isinstance(value, str):
            return f"{key} is {describe(value)}, not a string"
    return None


def _read_config(config_path: Path) -> dict[str, Any] | str:
    """The ``config`` of a run file, or why the run cannot be used (``FILE:LINE: ...``)."""
    try:
        data = parse_json(config_path.read_bytes())
    except OSError as err:
        return f"{config_path}:1: unreadable config ({type(err).__name__}), skipping the run"
    except BadJSON as err:
        return f"{config_path}:{err.lineno}: unreadable config ({err.problem}), skipping the run"
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version not in READABLE_SCHEMAS or isinstance(version, bool) or not isinstance(data.get("config"), dict):
        return (f"{config_path}:1: schema version {describe(version)}, this decomp reads "
                f"{', '.join(map(str, READABLE_SCHEMAS))}; skipping the run")
    problem = config_problem(data["config"])
    if problem is not None:
        return f"{config_path}:1: config {problem}; skipping the run"
    return data["config"]


def read_run(path: Path) -> Run | str:
    """One run directory, or why it cannot be used (a warning's text, naming the file and line)."""
    config_path = _run_file(Path(path)) or Path(path) / "config.json"
    config = _read_config(config_path)
    if isinstance(config, str):
        return config
    run = Run(Path(path), config)
    run.metrics = _read(run.path / "metrics.jsonl")
    run.decompositions = _read(run.path / "decomposition.jsonl")
    run.sweeps = _read(run.path / "sweeps.jsonl")
    run.curvature = _read(run.path / "curvature.jsonl")
    run.horizons = _read(run.path / "horizon.jsonl")
    return run


def load_run(path: Path) -> Run | None:
    """One run directory, or ``None`` (with a warning) when it cannot be used."""
    run = read_run(path)
    if isinstance(run, str):
        warnings.warn(run, stacklevel=2)
        return None
    return run


def load_runs(paths: Iterable[Path | str]) -> list[Run]:
    """Every usable run under ``paths`` (run directories or their parents), sorted by regime and seed."""
    dirs = _run_dirs(Path(p) for p in paths)
    if not dirs:
        raise AnalysisError("no run directories found (a run directory holds config.json)")
    read = [read_run(d) for d in dirs]
    runs = [r for r in read if isinstance(r, Run)]
    skipped = [r for r in read if isinstance(r, str)]
    for problem in skipped:
        warnings.warn(problem, stacklevel=2)
    if not runs:  # the CLI prints this one line, not the warnings: name the first reason
        raise AnalysisError(f"no usable run directory: {len(skipped)} skipped (the first: {skipped[0]})")
    order = {name: i for i, name in enumerate(("detach", "detach-inputs", "frozen", "distill", "ce", "policy", "occ",
                                              "occ-split", "cosine", "oracle"))}
    return sorted(runs, key=lambda r: (order.get(r.regime, 9), r.regime, r.seed, str(r.path)))


def regimes_of(runs: list[Run]) -> list[str]:
    seen: list[str] = []
    for r in runs:
        if r.regime not in seen:
            seen.append(r.regime)
    return seen
