"""Per-arm summaries of the study's run directories, with intervals over seeds.

Every number here is a statistic of runs (seeds), never of pooled records (docs/estimators.md §5):
a per-run value first, then a mean over seeds with a 95% t-interval, or a paired difference by
seed (the arms of one seed share a warm start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from decomp.results.rundata import Run, regimes_of
from decomp.vocabulary import TERMS
from decomp.results.stats import (
    early_late,
    finite,
    interval_verdict,
    paired_difference,
    t_interval,
)

MIN_SEEDS = 3
MARGIN = 0.02  # non-inferiority margin: 2 points of held-out accuracy
ACCEPTANCE_STEPS = 50  # the acceptance rate of a run: its mean over the last 50 steps


def by_seed(runs: list[Run], arm: str, value) -> dict[int, float]:
    """``{seed: value(run)}`` for the arm's runs whose value is finite."""
    return {r.seed: v for r in runs if r.regime == arm and finite(v := value(r))}


def final_accuracy(run: Run, k: int) -> float:
    return run.final_accuracy_mean(k)


def acceptance_rate(run: Run) -> float:
    """The MTP head's speculative-sampling acceptance rate, mean over the run's last steps."""
    values = [m["mtp_acceptance_rate"] for m in run.metrics if m["step"] > 0 and finite(m.get("mtp_acceptance_rate"))]
    return float(np.mean(values[-ACCEPTANCE_STEPS:])) if values else math.nan


@dataclass(frozen=True)
class Comparison:
    """A paired difference of one arm against a baseline, its interval and verdict."""

    arm: str
    baseline: str
    difference: dict[str, Any]  # paired_difference: value, low, high, n, keys
    rule: str
    verdict: str


def compare(runs: list[Run], arm: str, baseline: str, k: int, threshold: float, strict: bool) -> Comparison:
    """The paired difference of final accuracies ``arm − baseline`` against ``threshold``
    (:func:`decomp.results.stats.interval_verdict` over ≥ ``MIN_SEEDS`` seeds)."""
    d = paired_difference(by_seed(runs, arm, lambda r: final_accuracy(r, k)),
                          by_seed(runs, baseline, lambda r: final_accuracy(r, k)))
    op = ">" if strict else "≥"
    bound = f"{100 * threshold:+.0f} points".replace("-", "−") if threshold else "0"
    rule = (f"paired by seed, ≥ {MIN_SEEDS} seeds, 95% t-interval of mean({arm} − {baseline}): holds if low {op} "
            f"{bound}, does not hold if high < {bound}")
    return Comparison(arm, baseline, d, rule, interval_verdict(d, threshold, min_n=MIN_SEEDS, strict=strict))


def non_inferiority(runs: list[Run], arm: str, baseline: str, k: int, margin: float = MARGIN) -> Comparison:
    """``arm`` matches or beats ``baseline``: the lower 95% bound of the paired difference ≥ −margin."""
    return compare(runs, arm, baseline, k, -margin, strict=False)


def superiority(runs: list[Run], arm: str, baseline: str, k: int) -> Comparison:
    """``arm`` beats ``baseline``: the lower 95% bound of the paired difference > 0."""
    return compare(runs, arm, baseline, k, 0.0, strict=True)


def accuracy_rows(runs: list[Run], k: int, baseline: str = "detach") -> list[dict[str, Any]]:
    """Per arm: warm start and final accuracy over seeds, and the paired difference to ``baseline``."""
    rows = []
    base = by_seed(runs, baseline, lambda r: final_accuracy(r, k))
    for arm in regimes_of(runs):
        final = by_seed(runs, arm, lambda r: final_accuracy(r, k))
        rows.append({
            "arm": arm, "seeds": sorted(final), "warm": t_interval(list(by_seed(runs, arm, lambda r: r.warm_accuracy).values())),
            "final": t_interval(list(final.values())),
            "vs_baseline": paired_difference(final, base) if arm != baseline else None,
            "acceptance": t_interval(list(by_seed(runs, arm, acceptance_rate).values())),
        })
    return rows


def term_rows(runs: list[Run], direction: str = "active", split: str = "heldout") -> list[dict[str, Any]]:
    """Per arm: early and late means (first and last third of a run's instrumented updates) of the
    correlation C, cross term X and penalty P along ``direction``, each a mean over seeds with a
    95% t-interval; records counted once."""
    rows = []
    for arm in regimes_of(runs):
        per_run: dict[str, list[float]] = {f"{t}_{w}": [] for t in TERMS
                                           for w in ("early", "late")}
        n_records = 0
        for run in (r for r in runs if r.regime == arm):
            recs = [x for x in run.records(direction, split) if not x.get("same_as")] or run.records(direction, split)
            n_records += len(recs)
            for term in TERMS:
                early, late, _ = early_late([x["step"] for x in recs], [x[term] for x in recs])
                per_run[f"{term}_early"].append(early)
                per_run[f"{term}_late"].append(late)
        rows.append({"arm": arm, "records": n_records, **{k: t_interval(v) for k, v in per_run.items()}})
    return rows
