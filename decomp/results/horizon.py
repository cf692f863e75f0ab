"""The ``k``-step records (``horizon.jsonl``) against the one-step ones, run by run (docs/method.md §3.6).

A run with ``horizon = k > 1`` judges each instrumented update's MTP term over ``k`` updates
(:mod:`decomp.horizon`): ``λ̂_k = argmax_λ ΔJ_k(λ)``, its gain ``gain_hat_k = ΔJ_k(λ̂_k)``, the
``k``-step gains of the applied ``coef`` (``gain_k_coef``), of the one-step ``λ̂``
(``gain_k_lambda_hat``) and of the horizon-aware model's ``λ*_k`` (``gain_k_lambda_star_k``).
``gain_hat_k`` is the best gain the search evaluated; those three coefficients are evaluated
beside it, not searched, so a ratio ``gain_k_X / gain_hat_k`` can exceed 1 (a coefficient between
the search's grid points that beats its best one).

Records: the chosen direction's ``horizon.jsonl`` records on ``heldout`` when the run has them,
else on ``train`` (in-sample); a copy of the active record (``same_as: "active"``) stands for its
direction and counts once. The one-step ``λ̂`` is the ``lambda_hat`` of the same run's
decomposition record of the same ``(step, update, direction, split)``.

As in :mod:`decomp.results.validate`, each statistic is computed within each run, averaged within
each cluster (:func:`decomp.results.rundata.cluster_of`) and over clusters
(:func:`decomp.results.stats.combine_runs`: ``mean_k v_k``, ``v_k = mean_{i∈k} x_i``) with a 95%
cluster-bootstrap percentile interval. Fewer than 2 clusters, or no record, and a statistic is
not available (``value`` ``nan``, ``not_available`` says why); its per-run values stay in
``per_run``. Per run:

- ``sign_agreement``: share of the records with ``sign(λ̂_k) = sign(λ̂)``, over those where both
  are finite and non-zero (at the search bound only a sign is informative, and it counts);
- ``median_abs_log10_ratio``/``median_log10_ratio``: the median of ``|log10(λ̂_k/λ̂)|`` and of
  ``log10(λ̂_k/λ̂)`` (``> 0``: the ``k``-step optimum is larger) over the records where both are
  interior maxima (reason ``""``) of the same sign;
- ``one_step_efficiency``/``one_step_positive``: the median and the share ``> 0`` of
  ``gain_k_lambda_hat / gain_hat_k`` (records with ``gain_hat_k > 0``): the one-step optimum
  judged over ``k`` updates;
- ``star_sign_agreement``/``star_efficiency``: ``sign(λ*_k) = sign(λ̂_k)`` (both finite, non-zero)
  and the median ``gain_k_lambda_star_k / gain_hat_k``. ``λ*_k`` comes from the same batch as
  ``λ̂_k``: in-sample, it shares that batch's noise;
- ``star_other_sign_agreement``/``star_other_efficiency``: where the run has ``heldout2``
  records, the ``heldout`` record's ``λ*_k`` against the ``heldout2`` record's ``λ̂_k`` of the
  same update: same sign, and ``ΔJ_k(λ*_k)/gain_hat_k`` on the second batch, evaluated there by
  the loop (``gain_k_lambda_star_k_other``) or else read off its grid (``coefs_k``/``gains_k``;
  never interpolated);
- ``coef_efficiency``: the median ``gain_k_coef / gain_hat_k`` (the applied coefficient);
- ``interval_excludes_zero``: share of the records with a finite ``lambda_hat_k_interval``
  ``[lo, hi]`` where ``lo > 0`` or ``hi < 0`` (a sign a noise-aware oracle could act on);
- ``tail_ratio``: the median ``unit_displacement_k_norm / unit_displacement_first_norm``
  (``‖δ₁,k‖/‖δ₁‖``: how much the first moment's tail adds to the update's own displacement);
- ``accuracy_change_<name>`` for ``name`` in ``lambda_hat_k``, ``lambda_hat``, ``coef``: the mean
  over the records that carry it (a run with ``horizon_accuracy``; the active direction's) of
  ``accuracy_k_<name>_change``, the task's held-out greedy accuracy ``k`` updates after applying
  that coefficient minus that after ``λ = 0`` (the second target: what users care about, and
  noisier than ``ΔJ_k``; each record's own paired standard error is in the record);
  ``accuracy_change_lambda_hat_k_interior`` the same over the records whose ``λ̂_k`` is an interior
  maximum (one at the search bound is only a sign).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from decomp.results.rundata import Run, cluster_of, interior_optimum
from decomp.results.stats import N_RESAMPLES, abs_log10_ratio, combine_runs, finite, fmt_interval, median, share_positive

Record = dict[str, Any]
MIN_CLUSTERS = 2  # clusters a combined statistic needs (an interval)

# each combined statistic: the per-run count of its records, and what it says (the note's words)
STATISTICS: dict[str, str] = {
    "sign_agreement": "n_sign",
    "median_abs_log10_ratio": "n_log",
    "median_log10_ratio": "n_log",
    "one_step_efficiency": "n_one_step",
    "one_step_positive": "n_one_step",
    "star_sign_agreement": "n_star_sign",
    "star_efficiency": "n_star",
    "star_other_sign_agreement": "n_other_sign",
    "star_other_efficiency": "n_other",
    "coef_efficiency": "n_coef",
    "interval_excludes_zero": "n_interval",
    "tail_ratio": "n_tail",
    **{f"accuracy_change_{name}": f"n_accuracy_{name}"
       for name in ("lambda_hat_k", "lambda_hat_k_interior", "lambda_hat", "coef")},
}


def interior_k(record: Record) -> bool:
    """Whether ``λ̂_k`` is finite and an interior maximum (``lambda_hat_k_reason`` empty)."""
    reason = record.get("lambda_hat_k_reason")
    return finite(record.get("lambda_hat_k")) and (not isinstance(reason, str) or reason == "")


def _nonzero(x: Any) -> bool:
    return finite(x) and x != 0


def _ratio(num: Any, den: Any) -> float:
    """``num/den`` where both are finite and ``den > 0`` (a gain over the best gain), else ``nan``."""
    return float(num) / float(den) if finite(num) and finite(den) and den > 0 else math.nan


def _update(record: Record) -> tuple[Any, Any]:
    return record.get("step"), record.get("update")


def select_horizon(run: Run, direction: str) -> tuple[str, list[Record]]:
    """The split a run's horizon records are read on (``heldout`` when it has them for
    ``direction``, else ``train``) and those records."""
    split = "heldout" if run.horizon_records(direction, "heldout") else "train"
    return split, run.horizon_records(direction, split)


def one_step_of(run: Run, direction: str, split: str) -> Callable[[Record], Record | None]:
    """The decomposition record of a horizon record's update (same step, update, ``direction``
    and ``split``); for an active record or a copy of one whose direction has no decomposition
    record (:meth:`~decomp.results.rundata.Run.horizon_records`), the active one's."""
    own = {_update(r): r for r in run.records(direction, split)}
    active = {_update(r): r for r in run.records("active", split)}

    def of(record: Record) -> Record | None:
        found = own.get(_update(record))
        if found is None and (record.get("same_as") == "active" or record.get("direction") == "active"):
            return active.get(_update(record))
        return found
    return of


def optimum_pairs(records: list[Record], one_step: Callable[[Record], Record | None]) -> dict[str, float]:
    """``sign(λ̂_k) = sign(λ̂)`` and ``log10(λ̂_k/λ̂)`` of one run (module docstring)."""
    pairs = [(r, d) for r in records if (d := one_step(r)) is not None]
    signed = [(r["lambda_hat_k"], d["lambda_hat"]) for r, d in pairs
              if _nonzero(r.get("lambda_hat_k")) and _nonzero(d.get("lambda_hat"))]
    agree = [np.sign(a) == np.sign(b) for a, b in signed]
    logs = [(abs(r["lambda_hat_k"]), abs(d["lambda_hat"])) for r, d in pairs
            if interior_k(r) and interior_optimum(d) and _nonzero(r["lambda_hat_k"]) and _nonzero(d["lambda_hat"])
            and np.sign(r["lambda_hat_k"]) == np.sign(d["lambda_hat"])]
    k, one = np.array([a for a, _ in logs], dtype=float), np.array([b for _, b in logs], dtype=float)
    return {
        "n_sign": len(signed),
        "sign_agreement": float(np.mean(agree)) if agree else math.nan,
        "n_log": len(logs),
        "median_abs_log10_ratio": median(abs_log10_ratio(k, one)),
        "median_log10_ratio": median(np.log10(k / one)) if logs else math.nan,
    }


def gain_ratios(records: list[Record], key: str) -> list[float]:
    """``record[key] / gain_hat_k`` of each record where both are finite and ``gain_hat_k > 0``."""
    return [v for r in records if finite(v := _ratio(r.get(key), r.get("gain_hat_k")))]


def star_in_sample(records: list[Record]) -> dict[str, float]:
    """``λ*_k`` against ``λ̂_k`` of the same record (one batch: in-sample)."""
    signed = [(r["lambda_star_k"], r["lambda_hat_k"]) for r in records
              if _nonzero(r.get("lambda_star_k")) and _nonzero(r.get("lambda_hat_k"))]
    eff = gain_ratios(records, "gain_k_lambda_star_k")
    return {"n_star_sign": len(signed),
            "star_sign_agreement": float(np.mean([np.sign(a) == np.sign(b) for a, b in signed])) if signed else math.nan,
            "n_star": len(eff), "star_efficiency": median(eff)}


def gain_on_grid(record: Record, coef: float) -> float:
    """``ΔJ_k(coef)`` where ``coef`` is on the record's evaluated grid (``coefs_k``), else ``nan``
    (never interpolated)."""
    coefs, gains = record.get("coefs_k") or [], record.get("gains_k") or []
    for c, g in zip(coefs, gains, strict=False):
        if math.isclose(c, coef, rel_tol=1e-12, abs_tol=0.0):
            return float(g) if finite(g) else math.nan
    return math.nan


def other_gain(first: Record, second: Record) -> float:
    """``ΔJ_k`` on the second batch at the first batch's ``λ*_k``: the second record's
    ``gain_k_lambda_star_k_other`` (the loop evaluates it there), else from its grid."""
    star = first["lambda_star_k"]
    if finite(second.get("lambda_star_k_other")) and math.isclose(second["lambda_star_k_other"], star, rel_tol=1e-12):
        value = second.get("gain_k_lambda_star_k_other")
        return float(value) if finite(value) else math.nan
    return gain_on_grid(second, star)


def star_out_of_sample(run: Run, direction: str) -> dict[str, float]:
    """The ``heldout`` record's ``λ*_k`` judged on the ``heldout2`` record of the same update:
    same sign as its ``λ̂_k``, and ``ΔJ_k(λ*_k)/gain_hat_k`` there where ``λ*_k`` is on its grid."""
    first = {_update(r): r for r in run.horizon_records(direction, "heldout")}
    pairs = [(first[_update(r)], r) for r in run.horizon_records(direction, "heldout2") if _update(r) in first]
    signed = [(a["lambda_star_k"], b["lambda_hat_k"]) for a, b in pairs
              if _nonzero(a.get("lambda_star_k")) and _nonzero(b.get("lambda_hat_k"))]
    eff = [v for a, b in pairs if finite(a.get("lambda_star_k"))
           and finite(v := _ratio(other_gain(a, b), b.get("gain_hat_k")))]
    return {"n_other_pairs": len(pairs), "n_other_sign": len(signed),
            "star_other_sign_agreement": float(np.mean([np.sign(a) == np.sign(b) for a, b in signed]))
            if signed else math.nan,
            "n_other": len(eff), "star_other_efficiency": median(eff)}


def excludes_zero(records: list[Record]) -> tuple[float, int]:
    """Share of the records with a finite ``λ̂_k`` interval ``[lo, hi]`` that excludes 0
    (``lo > 0`` or ``hi < 0``), and how many have one."""
    bands = [iv for r in records if isinstance(iv := r.get("lambda_hat_k_interval"), list) and len(iv) == 2
             and finite(iv[0]) and finite(iv[1])]
    return (float(np.mean([lo > 0 or hi < 0 for lo, hi in bands])) if bands else math.nan), len(bands)


def tail_ratios(records: list[Record]) -> list[float]:
    """``‖δ₁,k‖/‖δ₁‖`` of each record where both norms are finite and ``‖δ₁‖ > 0``."""
    return [v for r in records
            if finite(v := _ratio(r.get("unit_displacement_k_norm"), r.get("unit_displacement_first_norm")))]


def accuracy_changes(records: list[Record]) -> dict[str, Any]:
    """Per coefficient name, the mean accuracy change after ``k`` updates and its record count;
    for ``λ̂_k`` also over the records where it is an interior maximum (not at the search bound)."""
    out: dict[str, Any] = {}
    subsets = {name: (name, records) for name in ("lambda_hat_k", "lambda_hat", "coef")}
    subsets["lambda_hat_k_interior"] = ("lambda_hat_k", [r for r in records if interior_k(r)])
    for label, (name, recs) in subsets.items():
        values = [v for r in recs if finite(v := r.get(f"accuracy_k_{name}_change"))]
        out[f"n_accuracy_{label}"] = len(values)
        out[f"accuracy_change_{label}"] = float(np.mean(values)) if values else math.nan
    return out


def per_run_horizon(run: Run, direction: str) -> dict[str, Any]:
    """One run's statistics (module docstring)."""
    split, records = select_horizon(run, direction)
    one_step_eff = gain_ratios(records, "gain_k_lambda_hat")
    coef_eff = gain_ratios(records, "gain_k_coef")
    share, n_interval = excludes_zero(records)
    tail = tail_ratios(records)
    return {
        "path": str(run.path), "split": split, "n": len(records),
        **optimum_pairs(records, one_step_of(run, direction, split)),
        "n_one_step": len(one_step_eff), "one_step_efficiency": median(one_step_eff),
        "one_step_positive": share_positive(one_step_eff),
        **star_in_sample(records),
        **star_out_of_sample(run, direction),
        "n_coef": len(coef_eff), "coef_efficiency": median(coef_eff),
        "n_interval": n_interval, "interval_excludes_zero": share,
        "n_tail": len(tail), "tail_ratio": median(tail),
        **accuracy_changes(records),
    }


def availability(combined: dict[str, Any]) -> str:
    """Why a combined statistic is not available (``""`` when it is): no record, or fewer than
    ``MIN_CLUSTERS`` clusters (no interval; one cluster's value is not a result over runs)."""
    if not combined["n_runs"]:
        return "no records"
    if combined["n_clusters"] < MIN_CLUSTERS:
        return f"{combined['n_clusters']} cluster; an interval needs ≥ {MIN_CLUSTERS}"
    return ""


def combine_statistic(per_run: list[dict[str, Any]], key: str, count: str, clusters: list[str], seed: int,
                      n_resamples: int) -> dict[str, Any]:
    """The mean over clusters of one per-run statistic (:func:`decomp.results.stats.combine_runs`),
    or not available (:func:`availability`)."""
    used = [(p, c) for p, c in zip(per_run, clusters, strict=True) if finite(p[key])]
    out = combine_runs([p[key] for p, _ in used], n_records=sum(int(p[count]) for p, _ in used), seed=seed,
                       n_resamples=n_resamples, clusters=[c for _, c in used])
    reason = availability(out)
    if reason:
        out |= {"value": math.nan, "low": math.nan, "high": math.nan, "not_available": reason}
    return out


def horizon_stats(runs: list[Run], direction: str = "policy", seed: int = 0,
                  n_resamples: int = N_RESAMPLES) -> dict[str, Any]:
    """Every statistic of the module docstring for ``direction`` over the runs with horizon
    records; ``measured``: whether any run has a horizon record at all (of any direction)."""
    measured = [run for run in runs if run.horizons]
    chosen = [run for run in measured if run.horizon_records(direction)]
    per_run = [per_run_horizon(run, direction) for run in chosen]
    clusters = [cluster_of(run) for run in chosen]
    ks = sorted({int(r["horizon"]) for run in chosen for r in run.horizon_records(direction)})
    return {
        "direction": direction,
        "measured": bool(measured),
        "runs_with_horizon": len(measured),
        "directions": sorted({str(r["direction"]) for run in measured for r in run.horizons}),
        "horizon": ks,
        "n_runs": len(chosen),
        "n_clusters": len(set(clusters)),
        "n_records": sum(p["n"] for p in per_run),
        "n_measurements": sum(len(run.unique_horizon_records()) for run in measured),
        "splits": {s: sum(1 for p in per_run if p["split"] == s) for s in ("heldout", "train")},
        "heldout2_runs": sum(1 for p in per_run if p["n_other_pairs"]),
        "in_sample": "λ*_k is computed on the batch that λ̂_k maximises: star_sign_agreement and star_efficiency "
                     "are in-sample; star_other_* judge it on a second held-out batch (heldout2)",
        "statistics": {key: combine_statistic(per_run, key, count, clusters, seed, n_resamples)
                       for key, count in STATISTICS.items()},
        "per_run": per_run,
        "runs": [{"path": str(run.path), "regime": run.regime, "seed": run.seed, "cluster": c,
                  "split": p["split"], "records": p["n"]} for run, p, c in zip(chosen, per_run, clusters, strict=True)],
    }


def cell(d: dict[str, Any], spec: str = ".2f") -> str:
    """``value [low, high] (runs/records)``, or ``n/a (reason)``."""
    if d.get("not_available"):
        return f"n/a ({d['not_available']})"
    return f"{fmt_interval(d, spec)} ({d['n_runs']}/{d['n_records']})"


def horizon_note(h: dict[str, Any]) -> str:
    """One line for ``decomp validate``: every statistic with its interval and runs/records."""
    if not h["n_runs"]:
        return (f"Horizon: {h['runs_with_horizon']} run(s) have horizon.jsonl records, none of direction "
                f"`{h['direction']}` (directions there: {', '.join(h['directions'])})")
    s = h["statistics"].__getitem__
    ks = ", ".join(map(str, h["horizon"]))
    other = (f"λ*_k judged on the second held-out batch (heldout2, {h['heldout2_runs']} run(s)): same sign as its "
             f"λ̂_k {cell(s('star_other_sign_agreement'))}, gain_k(λ*_k)/gain_hat_k there "
             f"{cell(s('star_other_efficiency'), '.3g')} (evaluated there, or read off its grid, never "
             f"interpolated); " if h["heldout2_runs"] else "no run has heldout2 horizon records to judge λ*_k "
             "out of sample; ")
    return (
        f"Horizon (k = {ks}; horizon.jsonl, direction `{h['direction']}`) over {h['n_runs']} run(s) in "
        f"{h['n_clusters']} cluster(s), {h['n_records']} records (copies of the active record count once; split "
        f"heldout in {h['splits']['heldout']} run(s), train (in-sample) in {h['splits']['train']}): "
        f"sign(λ̂_k) = sign(one-step λ̂) {cell(s('sign_agreement'))}; median |log10(λ̂_k/λ̂)| "
        f"{cell(s('median_abs_log10_ratio'))}, signed {cell(s('median_log10_ratio'), '+.2f')} (> 0: the k-step "
        f"optimum is larger; both interior, same sign); the one-step λ̂ over k updates: median "
        f"gain_k(λ̂)/gain_hat_k {cell(s('one_step_efficiency'), '.3g')}, > 0 in {cell(s('one_step_positive'))}; "
        f"λ*_k (from the same batch as λ̂_k: in-sample) same sign as λ̂_k {cell(s('star_sign_agreement'))}, "
        f"median gain_k(λ*_k)/gain_hat_k {cell(s('star_efficiency'), '.3g')}; " + other +
        f"the applied coefficient: median gain_k(coef)/gain_hat_k {cell(s('coef_efficiency'), '.3g')}; "
        f"λ̂_k's 95% interval excludes 0 in {cell(s('interval_excludes_zero'))} of the records; median tail "
        f"ratio ‖δ₁,k‖/‖δ₁‖ {cell(s('tail_ratio'), '.3g')}; held-out greedy accuracy k updates later, change to "
        f"λ = 0 (horizon_accuracy): at λ̂_k {cell(s('accuracy_change_lambda_hat_k'), '+.3f')} (interior λ̂_k only "
        f"{cell(s('accuracy_change_lambda_hat_k_interior'), '+.3f')}), at the one-step λ̂ "
        f"{cell(s('accuracy_change_lambda_hat'), '+.3f')}, at the applied λ {cell(s('accuracy_change_coef'), '+.3f')} "
        f"(per-run statistics averaged over clusters, "
        f"[95% cluster-bootstrap interval] (runs/records); n/a: no records or fewer than {MIN_CLUSTERS} clusters)")

