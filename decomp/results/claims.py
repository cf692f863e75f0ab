"""The paper's claims (arXiv 2605.28184; docs/estimators.md §6) checked against run data, each by a stated rule.

The unit of replication is the run (a seed of a regime): each claim summarises every run by one
number, then tests the mean over runs with a two-sided 95% Student t-interval over runs
(:func:`decomp.results.stats.t_interval`). Runs that share one policy trajectory (``detach``,
``frozen`` and ``distill`` of one task and seed, and collapsed runs:
:func:`decomp.results.rundata.cluster_of`) are one cluster: averaged first, counted once
(:func:`decomp.results.stats.cluster_t_interval`; ``n_runs`` counts clusters). With the 3–10
seeds of a study a percentile bootstrap's interval hugs the smallest and largest per-run values and under-covers; the t-interval
does not. Records of one run (consecutive, autocorrelated updates) never count as independent.
A claim about regimes or seeds needs ``MIN_RUNS`` runs (paired seeds for OCC vs detach): with
fewer it is ``inconclusive``, whatever the data say.

Every :class:`Claim` states the statistic the rule tests (its value and interval), the rule, the
runs and records behind it and the verdict: ``holds``, ``does not hold`` or ``inconclusive``
(too few runs, or an interval that straddles a threshold); a claim that judges an estimator
against ``λ̂``/``λ*`` is ``no signal`` instead of ``does not hold`` or ``inconclusive`` where the
target's measured noise ceiling does not clear chance (:func:`decomp.results.validate.has_signal`). Where a run has held-out records
(``split: heldout``) of the direction a claim reads, they are used, else its training ones.

| claim | data | per-run statistic → rule |
|---|---|---|
| detach: both terms zero | active records of ``detach`` runs | deterministic: holds if every ``C`` and ``P`` is exactly 0 (≥ 1 run) |
| ce: correlation weak or negative, net effect negative | ``ce`` direction of ``ce`` runs (of the other runs when there is none) | median realized ``ΔJ_MTP`` and median cosine → holds if the interval of the mean median ``ΔJ_MTP`` is below 0 and that of the cosine ≤ ``COSINE_WEAK``; does not hold if either lies above |
| policy: correlation decays while penalty persists | active records of ``policy`` runs | late/early third ratios ``r_C = C_late/|C_early|`` (every run with ``C_early ≠ 0``), ``r_P = P_late/P_early`` → holds if every run starts with ``C``, ``P`` > 0, the interval of ``r_C`` lies below ``DECAY`` and that of ``r_P`` at or above ``PERSIST``; does not hold if ``r_C``'s lies at or above ``NO_DECAY``, ``r_P``'s below ``VANISH``, or no run starts with ``C`` > 0 (``P`` > 0) |
| OCC matches or beats detach | held-out accuracy, paired by seed | mean of the last ``FINAL_EVALUATIONS`` evaluations; paired difference occ − detach → holds if its lower bound ≥ −``ACCURACY_MARGIN``, does not hold if its upper bound < −``ACCURACY_MARGIN`` |
| the proxy tracks the optimal coefficient | ``reference`` estimate and ``λ̂`` (``λ*`` when no record has ``λ̂``), ``policy`` direction | Spearman ρ within the run → holds if the interval of the mean ρ lies above 0, does not hold if below 0; no signal if the target's split-half ρ does not clear 0 |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from decomp.results.rundata import FINAL_EVALUATIONS, Run, cluster_of
from decomp.results.stats import (
    CONFIDENCE,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NO_SIGNAL,
    cluster_t_interval,
    early_late,
    finite,
    fmt,
    interval_verdict,
    median,
    paired_difference,
)
from decomp.results.validate import (
    MIN_RECORDS,
    MIN_RUNS,
    TARGET_NAMES,
    ceiling_stats,
    per_run_estimator,
    select_records,
    target_of,
)

# MIN_RUNS (from validate): clusters (or paired seeds) a claim about regimes or seeds needs
COSINE_WEAK = 0.1
DECAY, NO_DECAY, PERSIST, VANISH = 0.5, 0.8, 0.5, 0.25
ACCURACY_MARGIN = 0.02  # 2 points of held-out accuracy
LEVEL = f"{100 * CONFIDENCE:.0f}%"
INTERVAL = f"{LEVEL} t-interval over runs"


@dataclass(frozen=True)
class Claim:
    claim: str
    statistic: str  # the statistic the rule tests, with its value
    interval: str  # its interval ("" where the claim is deterministic)
    rule: str  # the thresholds used
    verdict: str
    n_runs: int  # the runs (seeds) the statistic rests on
    n_records: int  # the records (or evaluations) behind them
    value: float = math.nan
    low: float = math.nan
    high: float = math.nan


def _ci(d: dict[str, Any], spec: str = "+.3g", scale: float = 1.0) -> str:
    lo, hi = d.get("low"), d.get("high")
    if not (finite(lo) and finite(hi)):
        return "no interval (fewer than 2 runs)"
    return f"[{fmt(scale * lo, spec)}, {fmt(scale * hi, spec)}]"


def detach_zero(runs: list[Run]) -> Claim:
    name = "detach: both terms zero"
    recs = [r for run in runs if run.regime == "detach" for r in run.records("active")]
    n_runs = sum(1 for run in runs if run.regime == "detach" and run.records("active"))
    rule = ("deterministic: holds if every C and P of the detach runs' active records is exactly 0 (≥ 1 run); "
            "does not hold if one is not")
    if not recs:
        return Claim(name, "no detach run with active records", "", rule, INCONCLUSIVE, 0, 0)
    values = [abs(float(r[k])) for r in recs for k in ("correlation", "penalty")]
    worst = max((v for v in values if math.isfinite(v)), default=math.nan)
    bad = sum(not math.isfinite(v) for v in values)
    text = f"max(|C|, |P|) = {fmt(worst)}" + (f" ({bad} non-finite values)" if bad else "")
    if finite(worst) and worst > 0:
        verdict = FAILS
    else:
        verdict = HOLDS if not bad else INCONCLUSIVE
    return Claim(name, text, "", rule, verdict, n_runs, len(recs), worst)


def _ce_source(runs: list[Run]) -> tuple[list[Run], str]:
    ce_runs = [run for run in runs if run.regime == "ce" and run.records("ce")]
    if ce_runs:
        return ce_runs, "ce runs"
    return [run for run in runs if run.records("ce")], "shadow ce direction of non-ce runs"


def _ce_per_run(run: Run) -> tuple[float, float, int, str]:
    """Median realized ΔJ_MTP and median cosine of a run's ce-direction records (preferred split),
    their number and the run's cluster."""
    _, recs = select_records(run, "ce")
    recs = [r for r in recs if finite(r.get("realized")) and finite(r.get("cosine"))]
    return median([r["realized"] for r in recs]), median([r["cosine"] for r in recs]), len(recs), cluster_of(run)


def ce_negative(runs: list[Run]) -> Claim:
    name = "ce: correlation weak or negative, net effect negative"
    rule = (f"per run: median realized ΔJ_MTP and median cosine of the ce direction; over ≥ {MIN_RUNS} runs "
            f"({INTERVAL} of the means): holds if ΔJ_MTP's upper bound < 0 and the cosine's ≤ {COSINE_WEAK}; "
            f"does not hold if ΔJ_MTP's lower bound > 0 or the cosine's > {COSINE_WEAK}")
    source, where = _ce_source(runs)
    per_run = [_ce_per_run(run) for run in source]
    per_run = [p for p in per_run if p[2] > 0]
    n_records = sum(p[2] for p in per_run)
    clusters = [p[3] for p in per_run]
    realized = cluster_t_interval([p[0] for p in per_run], clusters)
    cosine = cluster_t_interval([p[1] for p in per_run], clusters)
    text = (f"{where}: mean over runs of the per-run median realized ΔJ_MTP = {fmt(realized['value'], '+.3g')}; "
            f"of the median cosine = {fmt(cosine['value'], '+.3f')} {_ci(cosine, '+.3f')}")
    interval = f"ΔJ_MTP {_ci(realized)}"
    if realized["n"] < MIN_RUNS:
        return Claim(name, text, interval, rule, INCONCLUSIVE, realized["n"], n_records, realized["value"],
                     realized["low"], realized["high"])
    if realized["high"] < 0 and cosine["high"] <= COSINE_WEAK:
        verdict = HOLDS
    elif realized["low"] > 0 or cosine["low"] > COSINE_WEAK:
        verdict = FAILS
    else:
        verdict = INCONCLUSIVE
    return Claim(name, text, interval, rule, verdict, realized["n"], n_records, realized["value"], realized["low"],
                 realized["high"])


def _decay_per_run(run: Run) -> dict[str, Any] | None:
    """Early/late third means of C and P over a policy run's active records (None: < 3 steps):
    ``r_C = C_late/|C_early|`` for every run with ``C_early ≠ 0`` — a run that starts with
    ``C < 0`` counts too (a ratio of the runs that start with ``C > 0`` alone would select them) —
    and ``r_P = P_late/P_early`` where ``P_early > 0``."""
    _, recs = select_records(run, "active")
    steps = [r["step"] for r in recs]
    c_early, c_late, n = early_late(steps, [r["correlation"] for r in recs])
    p_early, p_late, _ = early_late(steps, [r["penalty"] for r in recs])
    if n == 0:
        return None
    return {"c_early": c_early, "p_early": p_early, "n": n, "cluster": cluster_of(run),
            "r_c": c_late / abs(c_early) if c_early != 0 else math.nan,
            "r_p": p_late / p_early if p_early > 0 else math.nan}


def _decay_verdict(per_run: list[dict[str, Any]], r_c: dict[str, Any], r_p: dict[str, Any]) -> str:
    if len({p["cluster"] for p in per_run}) < MIN_RUNS:
        return INCONCLUSIVE
    starts_c = [p["c_early"] > 0 for p in per_run]
    starts_p = [p["p_early"] > 0 for p in per_run]
    if not any(starts_c) or not any(starts_p) or r_c["low"] >= NO_DECAY or r_p["high"] < VANISH:
        return FAILS
    if all(starts_c) and all(starts_p) and r_c["high"] < DECAY and r_p["low"] >= PERSIST:
        return HOLDS
    return INCONCLUSIVE


def policy_decay(runs: list[Run]) -> Claim:
    name = "policy: correlation decays while penalty persists"
    rule = (f"per run: late/early third means r_C = C_late/|C_early| (every run with C_early ≠ 0), r_P = "
            f"P_late/P_early of the active records; over ≥ {MIN_RUNS} runs ({INTERVAL} of the mean ratios): holds if every run starts with C > 0 and "
            f"P > 0, r_C's upper bound < {DECAY} and r_P's lower bound ≥ {PERSIST}; does not hold if r_C's lower "
            f"bound ≥ {NO_DECAY}, r_P's upper bound < {VANISH}, or no run starts with C > 0 (P > 0)")
    per_run = [p for p in (_decay_per_run(run) for run in runs if run.regime == "policy") if p is not None]
    n_records = int(sum(p["n"] for p in per_run))
    if not per_run:
        return Claim(name, "no policy run with ≥ 3 instrumented steps", "", rule, INCONCLUSIVE, 0, 0)
    clusters = [p["cluster"] for p in per_run]
    r_c = cluster_t_interval([p["r_c"] for p in per_run], clusters)
    r_p = cluster_t_interval([p["r_p"] for p in per_run], clusters)
    starts = sum(p["c_early"] > 0 for p in per_run)
    text = (f"mean r_C = {fmt(r_c['value'], '.2f')} ({r_c['n_runs']} runs with C_early ≠ 0, {starts} of them > 0), "
            f"mean r_P = {fmt(r_p['value'], '.2f')} ({r_p['n_runs']} runs with P_early > 0)")
    interval = f"r_C {_ci(r_c, '.2f')}; r_P {_ci(r_p, '.2f')}"
    verdict = _decay_verdict(per_run, r_c, r_p)
    return Claim(name, text, interval, rule, verdict, len(set(clusters)), n_records, r_c["value"], r_c["low"],
                 r_c["high"])


def final_accuracies(runs: list[Run], regime: str, k: int = FINAL_EVALUATIONS) -> dict[int, float]:
    """Per seed, :meth:`Run.final_accuracy_mean` of the ``regime``'s run of that seed (the mean
    when a seed has several)."""
    by_seed: dict[int, list[float]] = {}
    for run in runs:
        if run.regime == regime and finite(acc := run.final_accuracy_mean(k)):
            by_seed.setdefault(run.seed, []).append(acc)
    return {s: float(np.mean(v)) for s, v in by_seed.items()}


def occ_vs_detach(runs: list[Run], k: int = FINAL_EVALUATIONS) -> Claim:
    name = "OCC matches or beats detach"
    margin = 100 * ACCURACY_MARGIN
    rule = (f"per run: mean of the last {k} held-out evaluations (all when fewer); paired by seed (same warm start), "
            f"over ≥ {MIN_RUNS} seeds ({LEVEL} t-interval over seeds of the mean difference occ − detach): holds if its lower bound "
            f"≥ −{margin:.0f} points, does not hold if its upper bound < −{margin:.0f} points")
    d = paired_difference(final_accuracies(runs, "occ", k), final_accuracies(runs, "detach", k))
    seeds = d["keys"]
    paired = [r for r in runs if r.regime in ("occ", "detach") and r.seed in seeds and r.evaluations]
    n_runs, n_evals = len(paired), sum(min(k, len(r.evaluations)) for r in paired)
    if not seeds:
        return Claim(name, "no seed with both an occ and a detach run", "", rule, INCONCLUSIVE, 0, 0)
    text = f"mean paired difference occ − detach = {fmt(100 * d['value'], '+.1f')} points over {d['n']} seed(s)"
    interval = _ci(d, "+.1f", 100.0) + (" points" if d["n"] >= 2 else "")
    verdict = interval_verdict(d, -ACCURACY_MARGIN, min_n=MIN_RUNS)
    return Claim(name, text, interval, rule, verdict, n_runs, n_evals, d["value"], d["low"], d["high"])


def proxy_tracks(runs: list[Run], estimator: str = "reference") -> Claim:
    name = "the proxy tracks the optimal coefficient"
    chosen = [(run, select_records(run, "policy")[1]) for run in runs]
    chosen = [(run, g) for run, g in chosen if g]
    groups = [g for _, g in chosen]
    target = target_of(groups)
    rule = (f"per run: Spearman ρ of the {estimator} estimate with the target over the policy-direction records "
            f"(≥ {MIN_RECORDS}); over ≥ {MIN_RUNS} runs ({INTERVAL} of the mean ρ): holds if its lower bound > 0, "
            f"does not hold if its upper bound < 0; no signal (instead of does not hold or inconclusive) if the "
            f"target's measured split-half ρ between two held-out batches does not clear 0")
    per_run = [(per_run_estimator(g, estimator, target), cluster_of(run)) for run, g in chosen]
    used = [(p, c) for p, c in per_run if finite(p["spearman"])]
    rho = cluster_t_interval([p["spearman"] for p, _ in used], [c for _, c in used])
    n_records = sum(p["n"] for p, _ in used)
    ceiling = ceiling_stats([run for run, _ in chosen], "policy", clusters=[cluster_of(run) for run, _ in chosen])
    text = (f"mean within-run ρ({estimator}, {TARGET_NAMES[target]}) = {fmt(rho['value'], '+.2f')} "
            f"over {len(used)} run(s)")
    if ceiling["measured"]:
        split_half = ceiling["targets"][target]["t_interval"]["spearman"]
        text += f"; the target's split-half ρ {fmt(split_half['value'], '+.2f')} {_ci(split_half, '+.2f')}"
    else:
        text += "; no noise ceiling measured"
    interval = _ci(rho, "+.2f")
    if rho["n"] < MIN_RUNS:
        verdict = INCONCLUSIVE
    elif rho["low"] > 0:
        verdict = HOLDS
    else:
        verdict = FAILS if rho["high"] < 0 else INCONCLUSIVE
        if ceiling["measured"] and not ceiling["targets"][target]["signal"]["spearman"]:
            verdict = NO_SIGNAL
    return Claim(name, text, interval, rule, verdict, rho["n"], n_records, rho["value"], rho["low"], rho["high"])


def evaluate_claims(runs: list[Run]) -> list[Claim]:
    return [detach_zero(runs), ce_negative(runs), policy_decay(runs), occ_vs_detach(runs), proxy_tracks(runs)]
