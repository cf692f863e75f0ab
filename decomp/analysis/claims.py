"""The paper's claims (PAPER.md) checked against run data, each by a stated rule.

Every verdict is computed: ``holds``, ``does not hold`` or ``inconclusive`` (not enough data, or
the statistic falls between the two thresholds). Early/late means split a run's instrumented
updates into thirds and compare the first third with the last.

| claim | data | statistic and rule |
|---|---|---|
| detach: both terms zero | active records of ``detach`` runs | ``max(|C|, |P|)``: holds if exactly 0 |
| ce: correlation weak or negative, net effect negative | ``ce``-direction records of ``ce`` runs (of the other runs' shadow direction when there is no ``ce`` run) | median cosine and a one-sided Wilcoxon signed-rank test of realized ``ΔJ_MTP``: holds if median cosine ≤ 0.1 and realized < 0 (p < 0.05); does not hold if median cosine > 0.1 or realized > 0 (p < 0.05) |
| policy: correlation decays while penalty persists | active records of ``policy`` runs | late/early mean correlation ``r_C`` and penalty ``r_P``: holds if early C > 0, early P > 0, ``r_C < 0.5`` and ``r_P ≥ 0.5``; does not hold if early C ≤ 0, early P ≤ 0, ``r_C ≥ 0.8`` or ``r_P < 0.25`` |
| OCC matches or beats detach | final held-out accuracy, paired by seed | mean difference ``d`` (occ − detach) over ≥ 3 seeds: holds if ``d ≥ −2`` points, else does not hold |
| the proxy tracks the optimal coefficient | ``reference`` estimator vs ``λ*`` on ``policy``-direction records | Spearman ρ with 95% bootstrap CI: holds if the CI lies above 0, does not hold if it lies at or below 0 |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from decomp.analysis.rundata import Run
from decomp.analysis.validate import correlation_with_ci

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
COSINE_WEAK = 0.1
P_VALUE = 0.05
DECAY, NO_DECAY, PERSIST, VANISH = 0.5, 0.8, 0.5, 0.25
ACCURACY_TOLERANCE = 0.02
MIN_SEEDS = 3


@dataclass(frozen=True)
class Claim:
    claim: str
    statistic: str  # what was computed, with its value
    rule: str  # the threshold(s) used
    verdict: str
    n: int  # records or seeds the statistic rests on


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _thirds(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    steps = sorted({r["step"] for r in records})
    if len(steps) < 3:
        return [], []
    k = len(steps) // 3
    early, late = set(steps[:k]), set(steps[-k:])
    return [r for r in records if r["step"] in early], [r for r in records if r["step"] in late]


def detach_zero(runs: list[Run]) -> Claim:
    recs = [r for run in runs if run.regime == "detach" for r in run.records("active")]
    rule = "holds if max(|C|, |P|) over detach active records is exactly 0"
    if not recs:
        return Claim("detach: both terms zero", "no detach runs", rule, INCONCLUSIVE, 0)
    worst = max(max(abs(r["correlation"]), abs(r["penalty"])) for r in recs)
    return Claim("detach: both terms zero", f"max(|C|, |P|) = {worst:.3g}", rule, HOLDS if worst == 0 else FAILS, len(recs))


def ce_negative(runs: list[Run]) -> Claim:
    # the ce regime's own runs when there are any; otherwise the shadow ce direction of the others
    ce_runs = [run for run in runs if run.regime == "ce"]
    source = ce_runs if ce_runs else runs
    recs = [r for run in source for r in run.records("ce") if _finite(r["realized"]) and _finite(r.get("cosine"))]
    name = "ce: correlation weak or negative, net effect negative"
    rule = (f"holds if median cosine ≤ {COSINE_WEAK} and realized ΔJ_MTP < 0 (one-sided Wilcoxon p < {P_VALUE}); "
            f"does not hold if median cosine > {COSINE_WEAK} or realized > 0 (p < {P_VALUE})")
    if len(recs) < 10:
        return Claim(name, f"{len(recs)} ce records (need 10)", rule, INCONCLUSIVE, len(recs))
    cosine = float(np.median([r["cosine"] for r in recs]))
    realized = np.array([r["realized"] for r in recs])
    p_less = float(stats.wilcoxon(realized, alternative="less").pvalue)
    p_greater = float(stats.wilcoxon(realized, alternative="greater").pvalue)
    where = "ce runs" if ce_runs else "shadow ce direction of non-ce runs"
    text = (f"{where}: median cosine = {cosine:+.3f}; mean realized ΔJ_MTP = {realized.mean():+.3g} "
            f"(p_less = {p_less:.2g}, p_greater = {p_greater:.2g})")
    if cosine <= COSINE_WEAK and p_less < P_VALUE:
        verdict = HOLDS
    elif cosine > COSINE_WEAK or p_greater < P_VALUE:
        verdict = FAILS
    else:
        verdict = INCONCLUSIVE
    return Claim(name, text, rule, verdict, len(recs))


def policy_decay(runs: list[Run]) -> Claim:
    name = "policy: correlation decays while penalty persists"
    rule = (f"late/early means r_C, r_P: holds if early C > 0, early P > 0, r_C < {DECAY} and r_P ≥ {PERSIST}; "
            f"does not hold if early C ≤ 0, early P ≤ 0, r_C ≥ {NO_DECAY} or r_P < {VANISH}")
    early: list[dict[str, Any]] = []
    late: list[dict[str, Any]] = []
    for run in runs:
        if run.regime == "policy":
            e, lt = _thirds(run.records("active"))
            early += e
            late += lt
    if not early:
        return Claim(name, "no policy run with ≥ 3 instrumented updates", rule, INCONCLUSIVE, 0)
    c_e = float(np.mean([r["correlation"] for r in early]))
    c_l = float(np.mean([r["correlation"] for r in late]))
    p_e = float(np.mean([r["penalty"] for r in early]))
    p_l = float(np.mean([r["penalty"] for r in late]))
    r_c = c_l / c_e if c_e > 0 else math.nan
    r_p = p_l / p_e if p_e > 0 else math.nan
    text = f"C: {c_e:.3g} → {c_l:.3g} (r_C = {r_c:.2f}); P: {p_e:.3g} → {p_l:.3g} (r_P = {r_p:.2f})"
    if c_e <= 0 or p_e <= 0 or r_c >= NO_DECAY or r_p < VANISH:
        verdict = FAILS
    elif r_c < DECAY and r_p >= PERSIST:
        verdict = HOLDS
    else:
        verdict = INCONCLUSIVE
    return Claim(name, text, rule, verdict, len(early) + len(late))


def occ_vs_detach(runs: list[Run]) -> Claim:
    name = "OCC matches or beats detach"
    rule = f"over ≥ {MIN_SEEDS} paired seeds: holds if mean(occ − detach) ≥ −{100 * ACCURACY_TOLERANCE:.0f} points"
    acc = {(r.regime, r.seed): r.final_accuracy for r in runs if r.regime in ("occ", "detach")}
    seeds = sorted(s for (reg, s) in acc if reg == "occ" and ("detach", s) in acc)
    diffs = [acc[("occ", s)] - acc[("detach", s)] for s in seeds]
    diffs = [d for d in diffs if _finite(d)]
    if not diffs:
        return Claim(name, "no seed with both an occ and a detach run", rule, INCONCLUSIVE, 0)
    d = float(np.mean(diffs))
    text = f"mean final accuracy difference = {100 * d:+.1f} points over {len(diffs)} seed(s)"
    if len(diffs) < MIN_SEEDS:
        return Claim(name, text, rule, INCONCLUSIVE, len(diffs))
    return Claim(name, text, rule, HOLDS if d >= -ACCURACY_TOLERANCE else FAILS, len(diffs))


def proxy_tracks(runs: list[Run], estimator: str = "reference") -> Claim:
    name = "the proxy tracks the optimal coefficient"
    rule = f"Spearman ρ({estimator} estimate, λ*) on policy-direction records: holds if its 95% CI > 0, fails if ≤ 0"
    recs = [r for run in runs for r in run.records("policy")
            if _finite(r.get("lambda_star")) and _finite(r.get(f"coef_{estimator}"))]
    if len(recs) < 10:
        return Claim(name, f"{len(recs)} records with both values (need 10)", rule, INCONCLUSIVE, len(recs))
    x = np.array([r[f"coef_{estimator}"] for r in recs])
    y = np.array([r["lambda_star"] for r in recs])
    ci = correlation_with_ci(x, y, "spearman")
    text = f"ρ = {ci['value']:+.2f} [{ci['low']:+.2f}, {ci['high']:+.2f}]"
    if _finite(ci["low"]) and ci["low"] > 0:
        verdict = HOLDS
    elif _finite(ci["high"]) and ci["high"] <= 0:
        verdict = FAILS
    else:
        verdict = INCONCLUSIVE
    return Claim(name, text, rule, verdict, len(recs))


def evaluate_claims(runs: list[Run]) -> list[Claim]:
    return [detach_zero(runs), ce_negative(runs), policy_decay(runs), occ_vs_detach(runs), proxy_tracks(runs)]
