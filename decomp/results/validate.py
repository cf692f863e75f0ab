"""OCC estimators against the realized optimal coefficient ``λ̂``, run by run (docs/estimators.md §4, §5.3).

The unit of replication is the run: every statistic is computed within each run, then the
per-run values are averaged over runs with a 95% percentile interval from a bootstrap
(:func:`decomp.results.stats.combine_runs`, 2000 resamples, seeded). Runs that share one policy
trajectory (``detach``, ``frozen`` and ``distill`` of one task and seed, and any collapsed run of
that seed: :func:`decomp.results.rundata.cluster_of`) are one cluster: their per-run values are
averaged first, the clusters are resampled and each counts once. Each table cell states its runs
and records.

Records: the chosen direction (default ``policy``, the MTP loss OCC scales), on the ``heldout``
split when the run has one for that direction, else on ``train`` (in-sample); the result says
which split each run used. The target is ``λ̂`` (``lambda_hat``, the argmax over ``λ`` of the
realized ``ΔJ(λ)``), or ``λ*`` of the quadratic model when no record carries ``λ̂`` (older runs;
the result says so).

Units: the paper's proxies (``reference``, ``masked``, ``pooled``) scale like ``c·lr`` while
``λ̂`` scales like ``1/lr``; no magnitude of an estimate is compared with ``λ̂``. Per estimator
(every ``coef_<name>`` field present):

- ``sign_agreement``: per run, the share of records with ``sign(estimate) == sign(λ̂)`` (an
  estimate of 0 agrees with nothing);
- ``spearman``: per run, Spearman's ρ of the estimate with ``λ̂`` over the run's records
  (runs with fewer than ``MIN_RECORDS`` records or a constant sample have none);
- ``median_efficiency``/``share_positive_efficiency``: per run, the median and the share > 0 of
  the realized efficiency ``gain_E / gain_hat`` (records carrying ``gain_hat``);
- ``median_model_efficiency``: the same median for the quadratic model's efficiency
  ``gain(λ_est)/gain(λ*)`` (``model_efficiency_E``; ``efficiency_E`` of older records).

The efficiencies are reported only for estimators in the units of ``λ`` (:func:`in_lambda_units`):
for a proxy, ``|λ_E| ≪ |λ̂|`` makes ``gain(λ_E)/gain(λ̂) ≈ 2λ_E/λ*``, a restatement of its scale
(the table shows ``n/a (not in λ units)``).

``ceiling`` (the noise ceiling, docs/estimators.md §5.3): from runs with a second held-out batch
(``split: heldout2``), per run the split-half sign agreement and Spearman ρ of ``λ̂``, ``λ*``,
``C`` and ``P`` between the two batches of one update; each estimator's statistics are shown
beside the ceiling and corrected for attenuation. ``verdicts``: per estimator, whether it agrees
with the target in sign (mean agreement > ½) and in rank (mean ρ > 0), ``no signal`` where the
target's split-half reliability does not clear chance (:func:`has_signal`).

``lambda_star``: the quadratic model's ``λ*`` against a ``λ̂`` that does not share its batch: the
train batch's ``λ*`` (``coef_exact``) against the held-out ``λ̂``, judged on the second held-out
batch where there is one (efficiency ``gain_exact / gain_lambda_hat_other``, which can exceed 1),
else on the held-out batch (``gain_exact / gain_hat``, ≤ 1: ``λ̂`` maximises that batch's gain).
Per run: share of the same sign, median ``|log10(λ*/λ̂)|`` where both are positive and ``λ̂`` is
an interior maximum — at the search bound only its sign means something —, median realized
efficiency and its share > 0. Runs with training records only have no independent ``λ̂``.

``horizon`` (only where a run has ``horizon.jsonl`` records): the ``k``-step optimum ``λ̂_k``
against the one-step ``λ̂``, the one-step ``λ̂``, ``λ*_k`` and the applied coefficient judged over
``k`` updates (:func:`decomp.results.horizon.horizon_stats`).

``taylor``: over every record of every direction and split counted once (copies of the active
record left out), per run the median and 90th percentile of ``|realized − predicted|/|realized|``
and the share of records where ``predicted`` and ``realized`` have the same sign (records whose
MTP displacement moves ``J``: ``realized`` or ``predicted`` non-zero).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from decomp import runlog
from decomp.reliability import disattenuated, sign_agreement_probability
from decomp.results.horizon import horizon_note, horizon_stats
from decomp.results.rundata import (
    Run,
    cluster_of,
    estimator_names,
    interior_optimum,
    model_efficiency,
    realized_efficiency,
)
from decomp.results.stats import (
    CONFIDENCE,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    N_RESAMPLES,
    NO_SIGNAL,
    abs_log10_ratio,
    cluster_t_interval,
    combine_runs,
    finite,
    fmt,
    fmt_interval,
    median,
    percentile_interval,
    relative_residuals,
    resample_indices,
    share_positive,
    sign_agreement,
    spearman,
)
from decomp.rules import RULES

MIN_RECORDS = 3  # records a run needs for a within-run Spearman ρ
MIN_RUNS = 3  # clusters (independent trajectories) a verdict needs
PROXIES = ("reference", "masked", "pooled")  # the paper's proxies: ∝ c·lr, not in the units of λ
Group = list[dict[str, Any]]  # the records of one run
CEILING_TARGETS = {"lambda_hat": "λ̂", "lambda_star": "λ*", "correlation": "C", "penalty": "P"}
NOT_IN_LAMBDA_UNITS = "n/a (not in λ units)"


def select_records(run: Run, direction: str) -> tuple[str, Group]:
    """The split a run is validated on (``heldout`` when it has one for ``direction``) and the
    records of ``direction`` on it."""
    split = run.preferred_split(direction)
    return split, run.records(direction, split)


def in_lambda_units(estimator: str) -> bool:
    """Whether ``estimator`` is in the units of ``λ``: not one of the paper's ``PROXIES`` nor any
    registered rule computed from log-probs alone (such a rule cannot know the scale of ``λ``)."""
    rule = RULES.get(estimator)
    return estimator not in PROXIES and not (rule is not None and rule.needs <= frozenset({"logprobs"}))


def target_of(groups: list[Group]) -> str:
    """``lambda_hat`` when any record carries a finite ``λ̂``, else ``lambda_star``."""
    return "lambda_hat" if any(finite(r.get("lambda_hat")) for g in groups for r in g) else "lambda_star"


def per_run_estimator(records: Group, estimator: str, target: str = "lambda_hat") -> dict[str, float]:
    """One run's statistics of ``estimator`` (module docstring); ``n`` counts the records with
    a finite estimate and target, ``n_efficiency`` those with a finite realized efficiency."""
    rows = [r for r in records if finite(r.get(target)) and finite(r.get(f"coef_{estimator}"))]
    est = np.array([r[f"coef_{estimator}"] for r in rows], dtype=float)
    tgt = np.array([r[target] for r in rows], dtype=float)
    eff = [realized_efficiency(r, estimator) for r in records]
    model = [model_efficiency(r, estimator) for r in records]
    return {
        "n": len(rows),
        "sign_agreement": sign_agreement(est, tgt),
        "spearman": spearman(est, tgt) if len(rows) >= MIN_RECORDS else math.nan,
        "n_efficiency": sum(finite(e) for e in eff),
        "median_efficiency": median(eff),
        "share_positive_efficiency": share_positive(eff),
        "n_model_efficiency": sum(finite(e) for e in model),
        "median_model_efficiency": median(model),
    }


# each combined statistic: the per-run key, and the per-run count of its records
_ESTIMATOR_KEYS = {
    "sign_agreement": "n",
    "spearman": "n",
    "median_efficiency": "n_efficiency",
    "share_positive_efficiency": "n_efficiency",
    "median_model_efficiency": "n_model_efficiency",
}


_EFFICIENCY_KEYS = ("median_efficiency", "median_model_efficiency")  # magnitude statistics: λ units only


def _own_clusters(n: int, clusters: list[str] | None) -> list[str]:
    """``clusters``, or one cluster per run when none are given."""
    return [str(i) for i in range(n)] if clusters is None else list(clusters)


def _combine(per_run: list[dict[str, float]], keys: dict[str, str], seed: int,
             n_resamples: int = N_RESAMPLES, clusters: list[str] | None = None) -> dict[str, Any]:
    """Mean over clusters (runs averaged within their cluster first) of each per-run statistic in
    ``keys``, with its cluster-bootstrap interval and the runs and records behind it (runs whose
    statistic is undefined are left out)."""
    keys_of_runs = _own_clusters(len(per_run), clusters)
    out: dict[str, Any] = {}
    for key, count in keys.items():
        used = [(p, c) for p, c in zip(per_run, keys_of_runs, strict=True) if finite(p[key])]
        out[key] = combine_runs([p[key] for p, _ in used], n_records=sum(int(p[count]) for p, _ in used),
                                seed=seed, n_resamples=n_resamples, clusters=[c for _, c in used])
    return out


def _not_reported() -> dict[str, Any]:
    """A statistic left out on purpose (a magnitude of an estimator not in ``λ`` units)."""
    return {"value": math.nan, "low": math.nan, "high": math.nan, "n_runs": 0, "n_clusters": 0, "n_records": 0,
            "not_reported": NOT_IN_LAMBDA_UNITS}


def estimator_stats(groups: list[Group], estimator: str, target: str = "lambda_hat", seed: int = 0,
                    n_resamples: int = N_RESAMPLES, clusters: list[str] | None = None) -> dict[str, Any]:
    """The statistics of ``estimator`` over runs (``groups``: one record list per run; ``clusters``:
    each run's cluster, default one per run). Efficiencies only for an estimator in ``λ`` units."""
    per_run = [per_run_estimator(g, estimator, target) for g in groups]
    used = [p for p in per_run if p["n"] > 0]
    lam = in_lambda_units(estimator)
    combined = _combine(per_run, _ESTIMATOR_KEYS, seed, n_resamples, clusters)
    if not lam:
        combined |= {key: _not_reported() for key in _EFFICIENCY_KEYS}
    keys = _own_clusters(len(per_run), clusters)
    return {"n_runs": len(used), "n_clusters": len({c for p, c in zip(per_run, keys, strict=True) if p["n"] > 0}),
            "n_records": sum(p["n"] for p in used), "lambda_units": lam, **combined, "per_run": per_run}


def _by_update(records: Group) -> dict[tuple[Any, Any], dict[str, Any]]:
    """``{(step, update): record}`` (the last record of an update when one repeats)."""
    return {(r.get("step"), r.get("update")): r for r in records}


def _ratio(num: Any, den: Any) -> float:
    """``num/den`` where both are finite and ``den ≠ 0``, else ``nan``."""
    return float(num) / float(den) if finite(num) and finite(den) and den != 0 else math.nan


def lambda_star_rows(run: Run, direction: str) -> tuple[str, list[dict[str, Any]]]:
    """The run's ``λ*`` against a ``λ̂`` of another batch (module docstring): ``("heldout2",
    rows)`` when its ``heldout2`` records carry ``gain_lambda_hat_other``, else ``("heldout",
    rows)`` from its held-out records, else ``("none", [])``. Each row: ``star`` (the train
    batch's ``λ*``, ``coef_exact``), ``hat`` (the held-out ``λ̂``), ``interior`` (``λ̂`` an interior
    maximum) and ``efficiency`` (``gain_exact`` over the gain of ``λ̂`` on the judging batch)."""
    held = run.records(direction, "heldout")
    second = [r for r in run.records(direction, "heldout2") if finite(r.get("gain_lambda_hat_other"))]
    if second:
        first = _by_update(held)
        return "heldout2", [{"star": r.get("coef_exact"), "hat": r.get("lambda_hat_other"),
                             "interior": interior_optimum(first.get((r.get("step"), r.get("update")), {})),
                             "efficiency": _ratio(r.get("gain_exact"), r.get("gain_lambda_hat_other"))}
                            for r in second]
    if held:
        return "heldout", [{"star": r.get("coef_exact"), "hat": r.get("lambda_hat"), "interior": interior_optimum(r),
                            "efficiency": _ratio(r.get("gain_exact"), r.get("gain_hat"))} for r in held]
    return "none", []


def per_run_lambda_star(rows: list[dict[str, Any]]) -> dict[str, float]:
    """One run's comparison of ``λ*`` with ``λ̂`` (module docstring) from :func:`lambda_star_rows`."""
    pairs = [r for r in rows if finite(r["star"]) and finite(r["hat"])]
    star = np.array([r["star"] for r in pairs], dtype=float)
    hat = np.array([r["hat"] for r in pairs], dtype=float)
    interior = np.array([bool(r["interior"]) for r in pairs], dtype=bool)
    logs = abs_log10_ratio(star[interior], hat[interior])
    eff = [r["efficiency"] for r in rows if finite(r["efficiency"])]
    return {
        "n": len(pairs),
        "n_at_bound": int((~interior).sum()),
        "same_sign": float(np.mean(np.sign(star) == np.sign(hat))) if pairs else math.nan,
        "n_positive": int(logs.size),
        "median_abs_log10_ratio": float(np.median(logs)) if logs.size else math.nan,
        "n_efficiency": len(eff),
        "median_efficiency": median(eff),
        "share_positive_efficiency": share_positive(eff),
    }


def lambda_star_stats(runs: list[Run], direction: str = "policy", seed: int = 0, n_resamples: int = N_RESAMPLES,
                      clusters: list[str] | None = None) -> dict[str, Any]:
    """How far the train batch's ``λ*`` is from a ``λ̂`` of another batch, combined over clusters;
    ``against``: how many runs were judged on each batch."""
    chosen = [lambda_star_rows(run, direction) for run in runs]
    per_run = [per_run_lambda_star(rows) for _, rows in chosen]
    keys = {"same_sign": "n", "median_abs_log10_ratio": "n_positive", "median_efficiency": "n_efficiency",
            "share_positive_efficiency": "n_efficiency"}
    used = [p for p in per_run if p["n"] > 0 or p["n_efficiency"] > 0]
    against = {mode: sum(1 for (m, _), p in zip(chosen, per_run, strict=True) if m == mode and p in used)
               for mode in ("heldout2", "heldout")}
    return {"n_runs": len(used), "n_records": sum(p["n"] for p in used), "n_at_bound": sum(p["n_at_bound"] for p in used),
            "against": against, **_combine(per_run, keys, seed, n_resamples, clusters)}


# --- the noise ceiling (docs/estimators.md §5.3) ------------------------------------------------

def heldout_pairs(run: Run, direction: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The run's ``(heldout, heldout2)`` record pairs of ``direction``: two independent held-out
    batches of the same update (same step and update)."""
    first = _by_update(run.records(direction, "heldout"))
    return [(first[key], r) for r in run.records(direction, "heldout2")
            if (key := (r.get("step"), r.get("update"))) in first]


def per_run_ceiling(pairs: list[tuple[dict[str, Any], dict[str, Any]]], key: str) -> dict[str, float]:
    """One run's split-half reliability of ``key``: the share of pairs whose two batches agree in
    sign (:func:`decomp.results.stats.sign_agreement`) and Spearman ρ between the two batches
    (``≥ MIN_RECORDS`` pairs); ``n`` the pairs with both values finite."""
    rows = [(a[key], b[key]) for a, b in pairs if finite(a.get(key)) and finite(b.get(key))]
    x = np.array([r[0] for r in rows], dtype=float)
    y = np.array([r[1] for r in rows], dtype=float)
    return {"n": len(rows), "sign_agreement": sign_agreement(x, y),
            "spearman": spearman(x, y) if len(rows) >= MIN_RECORDS else math.nan}


def has_signal(split_half: dict[str, Any], chance: float) -> bool:
    """The target carries signal for a statistic when the lower end of the 95% t-interval over
    clusters of its per-run split-half value (:func:`decomp.results.stats.cluster_t_interval`, as
    the claims: with a few clusters a percentile bootstrap under-covers) clears chance (sign
    agreement: ½; Spearman ρ: 0). Without an interval (fewer than 2 clusters) it has none that
    can be shown."""
    return finite(split_half.get("low")) and split_half["low"] > chance


CHANCE = {"sign_agreement": 0.5, "spearman": 0.0}


def predicted_sign_agreement(records: Group, key: str) -> tuple[float, int]:
    """The split-half sign agreement of ``key`` that its records' sampling errors predict: the
    mean over records of ``Φ(z)² + Φ(−z)²`` with ``z = key/key_se``
    (:func:`decomp.reliability.sign_agreement_probability`), and the records with a finite ``z``."""
    z = [r[key] / r[f"{key}_se"] for r in records
         if finite(r.get(key)) and finite(r.get(f"{key}_se")) and r[f"{key}_se"] > 0]
    return (float(np.mean(sign_agreement_probability(np.array(z)))) if z else math.nan), len(z)


def ceiling_stats(runs: list[Run], direction: str = "policy", seed: int = 0, n_resamples: int = N_RESAMPLES,
                  clusters: list[str] | None = None) -> dict[str, Any]:
    """The noise ceiling over the runs with ``heldout2`` records (``measured``), per target of
    ``CEILING_TARGETS``: split-half sign agreement and Spearman ρ combined over clusters, and
    whether each clears chance (``signal``). Without such runs, ``predicted``: the split-half sign
    agreement of ``C`` and ``P`` that the held-out records' sampling errors predict."""
    keys = _own_clusters(len(runs), clusters)
    paired = [(heldout_pairs(run, direction), c) for run, c in zip(runs, keys, strict=True)]
    out: dict[str, Any] = {"measured": any(p for p, _ in paired), "n_runs": sum(1 for p, _ in paired if p),
                           "n_pairs": sum(len(p) for p, _ in paired), "targets": {}}
    for key in CEILING_TARGETS:
        per_run = [per_run_ceiling(p, key) for p, _ in paired]  # one per run (nan where unpaired)
        combined = _combine(per_run, {"sign_agreement": "n", "spearman": "n"}, seed, n_resamples, keys)
        t = {s: cluster_t_interval([p[s] for p in per_run], keys) for s in CHANCE}
        out["targets"][key] = combined | {"signal": {s: has_signal(t[s], CHANCE[s]) for s in CHANCE},
                                          "t_interval": t, "per_run": per_run}
    if not out["measured"]:
        out["predicted"] = {}
        for key in ("correlation", "penalty"):
            per_run = [predicted_sign_agreement(run.records(direction, run.preferred_split(direction)), key)
                       for run in runs]
            stats = [{"value": v, "n": n} for v, n in per_run]
            out["predicted"][key] = _combine(stats, {"value": "n"}, seed, n_resamples, keys)["value"]
    return out


def ceiling_of(statistic: str, split_half: float) -> float:
    """The best value a noise-free estimator can reach against one noisy draw of the target:
    Spearman ρ ``√r`` (``r`` the split-half ρ); sign agreement ``p = (1 + √(2a − 1))/2`` (``a`` the
    split-half agreement ``p² + (1 − p)²``, ``p`` the chance that one draw has the true sign)."""
    kappa = split_half if statistic == "spearman" else 2 * split_half - 1
    if not (finite(kappa) and kappa > 0):
        return math.nan
    return math.sqrt(kappa) if statistic == "spearman" else (1 + math.sqrt(kappa)) / 2


def corrected(statistic: str, value: float, split_half: float) -> float:
    """The estimator's statistic corrected for the target's attenuation
    (:func:`decomp.reliability.disattenuated`, the estimator's reliability 1: it is computed from
    the training batch, the same for both held-out batches): ρ/√r for Spearman ρ; for sign
    agreement on the sign-correlation scale ``κ = 2s − 1``, ``(1 + κ_E/√κ_T)/2`` — exact when the
    target's sign flips independently of the estimator's."""
    if statistic == "spearman":
        return disattenuated(value, split_half)
    return (1 + disattenuated(2 * value - 1, 2 * split_half - 1)) / 2


def attenuation(statistic: str, estimator_per_run: list[float], target_per_run: list[float], clusters: list[str],
                seed: int = 0, n_resamples: int = N_RESAMPLES) -> dict[str, Any]:
    """:func:`ceiling_of` and :func:`corrected` of the means over clusters, over the runs where both
    the estimator's statistic and the target's split-half value are finite, with intervals from
    one cluster bootstrap that resamples both together."""
    grouped: dict[str, tuple[list[float], list[float]]] = {}
    for e, t, c in zip(estimator_per_run, target_per_run, clusters, strict=True):
        if finite(e) and finite(t):
            grouped.setdefault(c, ([], []))
            grouped[c][0].append(float(e))
            grouped[c][1].append(float(t))
    est = np.array([np.mean(v[0]) for v in grouped.values()])
    tgt = np.array([np.mean(v[1]) for v in grouped.values()])
    k = int(est.size)
    out: dict[str, Any] = {}
    for name, fn in (("ceiling", lambda e, t: ceiling_of(statistic, t)),
                     ("corrected", lambda e, t: corrected(statistic, e, t))):
        value = fn(est.mean(), tgt.mean()) if k else math.nan
        band = {"low": math.nan, "high": math.nan}
        if k >= 2 and n_resamples >= 1:
            idx = resample_indices(k, n_resamples, seed)
            band = percentile_interval(np.array([fn(est[row].mean(), tgt[row].mean()) for row in idx]))
        out[name] = {"value": value, **band, "n_clusters": k, "n_runs": sum(len(v[0]) for v in grouped.values())}
    return out


def verdict(interval: dict[str, Any], chance: float, target_signal: bool | None) -> str:
    """Whether the estimator agrees with the target beyond chance (sign agreement > ½, ρ > 0),
    judged by the 95% t-interval over clusters of its per-run statistic (``interval``:
    :func:`decomp.results.stats.cluster_t_interval`, ``n`` clusters): ``inconclusive`` with fewer
    than ``MIN_RUNS`` clusters; ``holds`` when the lower end is above chance, ``does not hold``
    when the upper end is below, ``inconclusive`` when it straddles; any verdict but ``holds``
    becomes ``no signal`` where the target's measured noise ceiling does not clear chance
    (``target_signal`` False, :func:`has_signal`; ``None``: no ceiling measured)."""
    if interval["n"] < MIN_RUNS or not finite(interval.get("low")):
        return INCONCLUSIVE
    if interval["low"] > chance:
        return HOLDS
    judged = FAILS if interval["high"] < chance else INCONCLUSIVE
    return NO_SIGNAL if target_signal is False else judged


def taylor_stats(records: Group) -> dict[str, float]:
    """How well ``C + X − P`` predicts the realized change over ``records`` (one run)."""
    rows = [r for r in records if finite(r["realized"]) and finite(r["predicted"]) and (r["realized"] or r["predicted"])]
    if not rows:
        return {"n": 0, "median_relative_residual": math.nan, "p90_relative_residual": math.nan,
                "sign_agreement": math.nan}
    real = np.array([r["realized"] for r in rows])
    pred = np.array([r["predicted"] for r in rows])
    rel = relative_residuals(real, pred)
    return {
        "n": len(rows),
        "median_relative_residual": float(np.median(rel)) if rel.size else math.nan,
        "p90_relative_residual": float(np.percentile(rel, 90)) if rel.size else math.nan,
        "sign_agreement": float(np.mean(np.sign(real) == np.sign(pred))),
    }


def taylor_over_runs(runs: list[Run], seed: int = 0, n_resamples: int = N_RESAMPLES) -> dict[str, Any]:
    """:func:`taylor_stats` of each run's records counted once, combined over runs."""
    per_run = [taylor_stats(run.unique_records()) for run in runs]
    keys = dict.fromkeys(("median_relative_residual", "p90_relative_residual", "sign_agreement"), "n")
    used = [p for p in per_run if p["n"] > 0]
    return {"n_runs": len(used), "n_records": sum(p["n"] for p in used),
            **_combine(per_run, keys, seed, n_resamples, [cluster_of(run) for run in runs])}


def judge_estimator(stats: dict[str, Any], ceiling: dict[str, Any], target: str, clusters: list[str],
                    seed: int = 0, n_resamples: int = N_RESAMPLES) -> dict[str, Any]:
    """An estimator's verdicts (:func:`verdict`) and, where the ceiling was measured, its
    statistics beside the ceiling and corrected for attenuation (:func:`attenuation`)."""
    split_half = ceiling["targets"].get(target) if ceiling["measured"] else None
    out: dict[str, Any] = {"verdict": {}, "attenuation": {}}
    for statistic, chance in CHANCE.items():
        signal = None if split_half is None else split_half["signal"][statistic]
        interval = cluster_t_interval([p[statistic] for p in stats["per_run"]], clusters)
        out["verdict"][statistic] = verdict(interval, chance, signal)
        if split_half is not None:
            out["attenuation"][statistic] = attenuation(
                statistic, [p[statistic] for p in stats["per_run"]],
                [p[statistic] for p in split_half["per_run"]], clusters, seed, n_resamples)
    return out


def validate(runs: list[Run], direction: str = "policy", seed: int = 0,
             n_resamples: int = N_RESAMPLES) -> dict[str, Any]:
    """Every statistic of the module docstring for ``direction`` over ``runs``."""
    chosen = [(run, *select_records(run, direction)) for run in runs]
    chosen = [(run, split, recs) for run, split, recs in chosen if recs]
    groups = [recs for _, _, recs in chosen]
    clusters = [cluster_of(run) for run, _, _ in chosen]
    target = target_of(groups)
    realized = any("gain_hat" in r for g in groups for r in g)
    ceiling = ceiling_stats([run for run, _, _ in chosen], direction, seed, n_resamples, clusters)
    estimators = {}
    for name in estimator_names(r for g in groups for r in g):
        s = estimator_stats(groups, name, target, seed, n_resamples, clusters)
        estimators[name] = s | judge_estimator(s, ceiling, target, clusters, seed, n_resamples)
    horizon = horizon_stats(runs, direction, seed, n_resamples) if any(run.horizons for run in runs) else None
    return {
        "direction": direction,
        "target": target,
        "efficiency": "realized" if realized else "model",
        "confidence": CONFIDENCE,
        "n_resamples": n_resamples,
        "n_runs": len(groups),
        "n_clusters": len(set(clusters)),
        "n_records": sum(len(g) for g in groups),
        "splits": {s: sum(1 for _, sp, _ in chosen if sp == s) for s in ("heldout", "train")},
        "runs": [{"path": str(run.path), "regime": run.regime, "seed": run.seed, "split": split, "records": len(recs),
                  "cluster": cluster} for (run, split, recs), cluster in zip(chosen, clusters, strict=True)],
        "estimators": estimators,
        "ceiling": ceiling,
        "lambda_star": lambda_star_stats([run for run, _, _ in chosen], direction, seed, n_resamples, clusters),
        "taylor": taylor_over_runs(runs, seed, n_resamples),
        **({"horizon": horizon} if horizon is not None else {}),
    }


TARGET_NAMES = {"lambda_hat": "λ̂ (realized optimum)", "lambda_star": "λ* (quadratic model; no λ̂ in these records)"}


def _cell(d: dict[str, Any], spec: str = "+.2f") -> str:
    if d.get("not_reported"):
        return d["not_reported"]
    return "–" if not d.get("n_runs") else f"{fmt_interval(d, spec)} ({d['n_runs']}/{d['n_records']})"


def _beside(s: dict[str, Any], statistic: str, spec: str) -> str:
    """``ceiling / corrected`` of one statistic (values with intervals)."""
    a = s.get("attenuation", {}).get(statistic)
    if not a or not a["ceiling"]["n_clusters"]:
        return "–"
    return f"{fmt_interval(a['ceiling'], spec)} / {fmt_interval(a['corrected'], spec)}"


def _rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    measured = result.get("ceiling", {}).get("measured", False)
    head = ["estimator", "sign agree", "Spearman ρ within runs", "realized eff. (median/run)", "eff > 0",
            "model eff. (median/run)", "verdict (sign / ρ)"]
    if measured:
        head[3:3] = ["sign agree: ceiling / corrected", "ρ: ceiling / corrected"]
    rows = []
    for name, s in result["estimators"].items():
        row = [name, _cell(s["sign_agreement"], ".2f"), _cell(s["spearman"]),
               _cell(s["median_efficiency"], ".3g"), _cell(s["share_positive_efficiency"], ".2f"),
               _cell(s["median_model_efficiency"], ".3g")]
        v = s.get("verdict", {})
        row.append(f"{v.get('sign_agreement', '–')} / {v.get('spearman', '–')}")
        if measured:
            row[3:3] = [_beside(s, "sign_agreement", ".2f"), _beside(s, "spearman", "+.2f")]
        rows.append(row)
    return head, rows


def _ceiling_note(result: dict[str, Any]) -> str:
    """The noise ceiling: the targets' split-half reliability, or that none was measured."""
    c = result.get("ceiling")
    if not c:
        return "No noise ceiling measured."
    if not c["measured"]:
        pred = {k: v["value"] for k, v in c.get("predicted", {}).items()}
        predicted = "" if not any(finite(v) for v in pred.values()) else (
            "; the records' sampling errors predict a split-half sign agreement (Φ(z)² + Φ(−z)², z = term/SE; "
            f"predicted, not measured) of {fmt(pred.get('correlation'), '.2f')} for C and "
            f"{fmt(pred.get('penalty'), '.2f')} for P")
        return ("No noise ceiling measured: no run has a second held-out batch (split heldout2; run with "
                "noise_ceiling=true), so verdicts cannot tell a poor estimator from an unreliable target" + predicted)
    parts = [f"{CEILING_TARGETS[k]}: sign agreement {fmt_interval(t['sign_agreement'], '.2f')}, ρ "
             f"{fmt_interval(t['spearman'], '+.2f')}" for k, t in c["targets"].items()]
    low = [f"{CEILING_TARGETS[k]} ({', '.join(s for s, ok in t['signal'].items() if not ok)})"
           for k, t in c["targets"].items() if not all(t["signal"].values())]
    return (f"Noise ceiling over {c['n_runs']} run(s), {c['n_pairs']} pairs of held-out batches of one update "
            f"(heldout, heldout2): split-half " + "; ".join(parts) + ". A verdict is `no signal` (instead of `does "
            "not hold` or `inconclusive`) where the target's split-half value does not clear chance (the lower end "
            "of its 95% t-interval over clusters ≤ ½ for sign agreement, ≤ 0 for ρ)" + (f"; no signal: {'; '.join(low)}" if low else "")
            + ". Ceiling: the best a noise-free estimator can reach (√r for ρ, (1 + √(2a − 1))/2 for sign "
            "agreement); corrected: the estimator's statistic disattenuated for the target's noise (its own "
            "reliability 1: it is computed from the training batch)")


LAMBDA_STAR_AGAINST = {
    "heldout2": "the train batch's λ* (coef_exact) against the held-out batch's λ̂, both judged on the second "
                "held-out batch (efficiency gain_exact/gain_lambda_hat_other, which can exceed 1)",
    "heldout": "the train batch's λ* (coef_exact) against the held-out batch's λ̂ (efficiency gain_exact/gain_hat "
               "on that batch, ≤ 1: λ̂ maximises it)",
}


def _notes(result: dict[str, Any]) -> list[str]:
    sp = result["splits"]
    target = TARGET_NAMES[result["target"]]
    level = f"{100 * result['confidence']:.0f}%"
    notes = [
        (f"Direction `{result['direction']}`, target {target}; {result['n_runs']} run(s) in "
         f"{result.get('n_clusters', result['n_runs'])} cluster(s), {result['n_records']} "
         f"records, split used: heldout in {sp['heldout']} run(s), train (in-sample) in {sp['train']}. Each statistic "
         f"is computed within each run, averaged within each cluster (runs sharing one policy trajectory: detach, "
         f"frozen and distill of one seed, and collapsed runs) and over clusters (each counts once), [{level} "
         f"cluster-bootstrap percentile interval, {result['n_resamples']} resamples] (runs/records behind it). "
         f"Proxies are in their own units (∝ c·lr), λ̂ in λ units (∝ 1/lr): only scale-free statistics compare them; "
         f"their efficiencies only restate their scale and are not reported (n/a). Verdicts: sign "
         f"agreement > ½ and ρ > 0 by the 95% t-interval over ≥ {MIN_RUNS} clusters."),
        _ceiling_note(result),
    ]
    ls = result["lambda_star"]
    if ls["n_runs"]:
        against = "; ".join(f"{n} run(s): {LAMBDA_STAR_AGAINST[m]}" for m, n in ls["against"].items() if n)
        notes.append(
            f"λ* vs λ̂ ({against}) over {ls['n_runs']} run(s), {ls['n_records']} records: same sign "
            f"{fmt_interval(ls['same_sign'], '.2f')}, median |log10(λ*/λ̂)| {fmt_interval(ls['median_abs_log10_ratio'], '.2f')}"
            f" (both > 0, λ̂ interior: {ls['median_abs_log10_ratio']['n_records']} records; λ̂ at the search bound: "
            f"{ls['n_at_bound']}), realized efficiency of λ* "
            f"{fmt_interval(ls['median_efficiency'], '.3g')}, > 0 in {fmt_interval(ls['share_positive_efficiency'], '.2f')}")
    else:
        notes.append("λ* vs λ̂: no held-out record carries both λ̂ (lambda_hat) and the train batch's λ* "
                     "(coef_exact); a record's own λ* is never judged against the λ̂ of its own batch")
    t = result["taylor"]
    notes.append(
        f"Taylor residual over {t['n_runs']} run(s), {t['n_records']} records counted once: median "
        f"|realized − predicted|/|realized| {fmt_interval(t['median_relative_residual'], '.3g')}, 90th percentile "
        f"{fmt_interval(t['p90_relative_residual'], '.3g')}, sign(predicted) = sign(realized) in "
        f"{fmt_interval(t['sign_agreement'], '.2f')} of them (per-run statistics averaged over runs)")
    if result.get("horizon"):
        notes.append(horizon_note(result["horizon"]))
    return notes


def format_table(result: dict[str, Any], markdown: bool = False) -> str:
    """The validation table, plain text or Markdown, with its notes (target, split, intervals,
    ``λ*`` against ``λ̂``, Taylor residual)."""
    head, rows = _rows(result)
    notes = _notes(result)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + "\n\n" + "\n\n".join(n if n.endswith(".") else n + "." for n in notes)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines + [""] + notes)


def write_json(result: dict[str, Any], path: Path) -> None:
    """``result`` as strict JSON (non-finite floats as ``null``), written atomically
    (:func:`decomp.runlog.write_json`)."""
    runlog.write_json(Path(path), result)

