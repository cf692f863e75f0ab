"""The pilot's section of ``figures/STUDY.md``: where the MTP term matters, and which estimator
validates best — the two choices (:data:`analysis.design.SCALE`, :data:`~analysis.design.
BEST_ESTIMATOR`) the study's design makes from it.

Rules (stated in the report):

- the scale ``c`` is the smallest pilot scale at which the ``ce`` and ``policy`` terms move the
  held-out objective by at least ``MATTERS`` of what the RL step moves it (per run, the median
  over instrumented updates of ``|ΔJ_MTP| / |ΔJ_RL|`` on the held-out split, then the mean over
  runs): below it, the regimes are the same experiment as ``detach``;
- the estimator is the deployable one (any computed from the training batch alone: the proxies,
  the jvp level, ``trust_region``, ``exact`` — the train split's λ*) that tracks the held-out
  ``λ̂`` best by scale-free statistics alone (:func:`score`): the mean of its sign correlation
  ``κ = 2·(sign agreement) − 1`` and its within-run Spearman ρ with ``λ̂``, each the mean over
  runs (clusters) of ``decomp validate``. Realized efficiency is not used: for an estimator not in
  the units of ``λ`` it is ``≈ 2λ_E/λ*``, a reward for magnitude, not for tracking ``λ̂``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from analysis.summaries import non_inferiority
from decomp.results.rundata import Run, regimes_of
from decomp.results.stats import finite, fmt
from decomp.results.validate import validate

MATTERS = 0.1


def effect_ratio(run: Run) -> float:
    """Median over the run's held-out active records of ``|ΔJ_MTP| / |ΔJ_RL|``."""
    recs = [r for r in run.records("active", "heldout") if finite(r["realized"]) and finite(r.get("realized_rl"))
            and r["realized_rl"] != 0]
    return float(np.median([abs(r["realized"]) / abs(r["realized_rl"]) for r in recs])) if recs else math.nan


def scale_of(arm: str) -> float:
    return float(arm.split("-c")[1]) if "-c" in arm else math.nan


def chosen_scale(tasks: dict[str, list[Run]]) -> tuple[float, dict[float, float]]:
    """The rule of the module docstring over every task; ``(c, {c: mean ratio})``."""
    ratios: dict[float, list[float]] = {}
    for runs in tasks.values():
        for run in runs:
            c = scale_of(run.regime)
            if finite(c) and finite(ratio := effect_ratio(run)):
                ratios.setdefault(c, []).append(ratio)
    means = {c: float(np.mean(v)) for c, v in sorted(ratios.items())}
    return next((c for c, m in means.items() if m >= MATTERS), max(means, default=math.nan)), means


def score(stats: dict[str, Any]) -> float:
    """An estimator's scale-free score from its ``decomp validate`` statistics:
    ``½·(κ + ρ)`` with ``κ = 2·sign_agreement − 1`` and ``ρ`` the mean within-run Spearman ρ
    (both in [−1, 1], 1: always the sign and the ranking of ``λ̂``); ``nan`` where either is
    undefined."""
    sign, rho = stats["sign_agreement"]["value"], stats["spearman"]["value"]
    return 0.5 * ((2 * sign - 1) + rho) if finite(sign) and finite(rho) else math.nan


def best_estimator(tasks: dict[str, list[Run]]) -> tuple[str, dict[str, Any]]:
    """The rule of the module docstring over every pilot run; ``(name, validation result)``
    (``masked`` when no estimator has a score; ties go to the first in the validation's order)."""
    runs = [r for rs in tasks.values() for r in rs]
    result = validate(runs, direction="policy")
    scores = {name: v for name, s in result["estimators"].items() if finite(v := score(s))}
    return (max(scores, key=scores.get) if scores else "masked"), result


def pilot_section(tasks: dict[str, list[Run]], k: int) -> list[str]:
    from analysis import design
    from decomp.results.validate import format_table

    c, means = chosen_scale(tasks)
    best, result = best_estimator(tasks)
    lines = ["## Pilot", "",
             "`python -m analysis.study pilot`: `ce` and `policy` at c ∈ {" + ", ".join(f"{x:g}" for x in design.PILOT_SCALES)
             + "} against `detach`, seeds 0 and 1 of each task, 100 steps, the same instrumentation as the study.", "",
             f"Rule for c: the smallest scale at which the MTP term's realized change of the held-out objective is at "
             f"least {MATTERS:.0%} of the RL step's (per run the median of |ΔJ_MTP|/|ΔJ_RL| over instrumented "
             "updates, then the mean over runs); below it every regime is the detach experiment again.", "",
             "| c | mean ratio |ΔJ_MTP|/|ΔJ_RL| |", "|---|---|"]
    lines += [f"| {x:g} | {fmt(m, '.3g')} |" for x, m in means.items()]
    lines += ["", f"Chosen by the rule: **c = {c:g}** (the study uses c = {design.SCALE:g}).", ""]
    lines += ["| task | arm | seeds | final accuracy − detach (points) |", "|---|---|---|---|"]
    for task, runs in tasks.items():
        for arm in regimes_of(runs):
            if arm != "detach":
                d = non_inferiority(runs, arm, "detach", k).difference
                lines.append(f"| {task} | {arm} | {d['n']} | {fmt(100 * d['value'], '+.1f')} "
                             f"(per seed: {', '.join(fmt(100 * x, '+.1f') for x in d['differences'])}) |")
    lines += ["", "Estimators on the pilot's held-out records (policy direction):", "", format_table(result, markdown=True),
              "", "Rule for the estimator: the highest scale-free score ½·(κ + ρ), κ = 2·(sign agreement with λ̂) − 1 "
              "and ρ the within-run Spearman ρ with λ̂ (means over runs); realized efficiency is not used, since for "
              f"an estimator not in λ units it rewards magnitude (≈ 2λ_E/λ*). Chosen: **{best}** "
              f"(the study uses `{design.BEST_ESTIMATOR}`, chosen by an earlier rule: the highest median realized "
              "efficiency).", ""]
    return lines

