"""OCC estimators against the realized optimal coefficient ``λ̂``, run by run (docs/estimators.md §4).

The unit of replication is the run: every statistic is computed within each run, then the
per-run values are averaged over runs (each run counts once) with a 95% percentile interval
from a bootstrap that resamples whole runs (:func:`decomp.results.stats.combine_runs`, 2000
resamples, seeded). Each table cell states its runs and records.

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

``lambda_star``: how far the quadratic model's ``λ*`` is from ``λ̂`` (per run: share of the same
sign, median ``|log10(λ*/λ̂)|`` where both are positive and ``λ̂`` is an interior maximum — at
the search bound only its sign means something —, median realized efficiency
``gain_lambda_star / gain_hat`` and its share > 0).

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
from decomp.results.rundata import (
    Run,
    estimator_names,
    interior_optimum,
    model_efficiency,
    realized_efficiency,
)
from decomp.results.stats import (
    CONFIDENCE,
    N_RESAMPLES,
    abs_log10_ratio,
    combine_runs,
    finite,
    fmt_interval,
    median,
    relative_residuals,
    share_positive,
    sign_agreement,
    spearman,
)

MIN_RECORDS = 3  # records a run needs for a within-run Spearman ρ
Group = list[dict[str, Any]]  # the records of one run


def select_records(run: Run, direction: str) -> tuple[str, Group]:
    """The split a run is validated on (``heldout`` when it has one for ``direction``) and the
    records of ``direction`` on it."""
    split = run.preferred_split(direction)
    return split, run.records(direction, split)


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


def _combine(per_run: list[dict[str, float]], keys: dict[str, str], seed: int,
             n_resamples: int = N_RESAMPLES) -> dict[str, Any]:
    """Mean over runs of each per-run statistic in ``keys``, with its run-bootstrap interval and
    the runs and records behind it (runs whose statistic is undefined are left out)."""
    out: dict[str, Any] = {}
    for key, count in keys.items():
        used = [p for p in per_run if finite(p[key])]
        out[key] = combine_runs([p[key] for p in used], n_records=sum(int(p[count]) for p in used),
                                seed=seed, n_resamples=n_resamples)
    return out


def estimator_stats(groups: list[Group], estimator: str, target: str = "lambda_hat", seed: int = 0,
                    n_resamples: int = N_RESAMPLES) -> dict[str, Any]:
    """The statistics of ``estimator`` over runs (``groups``: one record list per run)."""
    per_run = [per_run_estimator(g, estimator, target) for g in groups]
    used = [p for p in per_run if p["n"] > 0]
    return {"n_runs": len(used), "n_records": sum(p["n"] for p in used),
            **_combine(per_run, _ESTIMATOR_KEYS, seed, n_resamples), "per_run": per_run}


def per_run_lambda_star(records: Group) -> dict[str, float]:
    """One run's comparison of ``λ*`` with ``λ̂`` (module docstring)."""
    rows = [r for r in records if finite(r.get("lambda_star")) and finite(r.get("lambda_hat"))]
    star = np.array([r["lambda_star"] for r in rows], dtype=float)
    hat = np.array([r["lambda_hat"] for r in rows], dtype=float)
    interior = np.array([interior_optimum(r) for r in rows], dtype=bool)
    logs = abs_log10_ratio(star[interior], hat[interior])
    eff = [r["gain_lambda_star"] / r["gain_hat"] for r in records
           if finite(r.get("gain_lambda_star")) and finite(r.get("gain_hat")) and r["gain_hat"] != 0]
    return {
        "n": len(rows),
        "n_at_bound": int((~interior).sum()),
        "same_sign": float(np.mean(np.sign(star) == np.sign(hat))) if rows else math.nan,
        "n_positive": int(logs.size),
        "median_abs_log10_ratio": float(np.median(logs)) if logs.size else math.nan,
        "n_efficiency": len(eff),
        "median_efficiency": median(eff),
        "share_positive_efficiency": share_positive(eff),
    }


def lambda_star_stats(groups: list[Group], seed: int = 0, n_resamples: int = N_RESAMPLES) -> dict[str, Any]:
    """How far the quadratic model's ``λ*`` is from ``λ̂``, combined over runs."""
    per_run = [per_run_lambda_star(g) for g in groups]
    keys = {"same_sign": "n", "median_abs_log10_ratio": "n_positive", "median_efficiency": "n_efficiency",
            "share_positive_efficiency": "n_efficiency"}
    used = [p for p in per_run if p["n"] > 0]
    return {"n_runs": len(used), "n_records": sum(p["n"] for p in used), "n_at_bound": sum(p["n_at_bound"] for p in used),
            **_combine(per_run, keys, seed, n_resamples)}


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
    return {"n_runs": len(used), "n_records": sum(p["n"] for p in used), **_combine(per_run, keys, seed, n_resamples)}


def validate(runs: list[Run], direction: str = "policy", seed: int = 0,
             n_resamples: int = N_RESAMPLES) -> dict[str, Any]:
    """Every statistic of the module docstring for ``direction`` over ``runs``."""
    chosen = [(run, *select_records(run, direction)) for run in runs]
    chosen = [(run, split, recs) for run, split, recs in chosen if recs]
    groups = [recs for _, _, recs in chosen]
    target = target_of(groups)
    realized = any("gain_hat" in r for g in groups for r in g)
    return {
        "direction": direction,
        "target": target,
        "efficiency": "realized" if realized else "model",
        "confidence": CONFIDENCE,
        "n_resamples": n_resamples,
        "n_runs": len(groups),
        "n_records": sum(len(g) for g in groups),
        "splits": {s: sum(1 for _, sp, _ in chosen if sp == s) for s in ("heldout", "train")},
        "runs": [{"path": str(run.path), "regime": run.regime, "seed": run.seed, "split": split, "records": len(recs)}
                 for run, split, recs in chosen],
        "estimators": {name: estimator_stats(groups, name, target, seed, n_resamples)
                       for name in estimator_names(r for g in groups for r in g)},
        "lambda_star": lambda_star_stats(groups, seed, n_resamples),
        "taylor": taylor_over_runs(runs, seed, n_resamples),
    }


TARGET_NAMES = {"lambda_hat": "λ̂ (realized optimum)", "lambda_star": "λ* (quadratic model; no λ̂ in these records)"}


def _cell(d: dict[str, Any], spec: str = "+.2f") -> str:
    return "–" if not d.get("n_runs") else f"{fmt_interval(d, spec)} ({d['n_runs']}/{d['n_records']})"


def _rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["estimator", "sign agree", "Spearman ρ within runs", "realized eff. (median/run)", "eff > 0",
            "model eff. (median/run)"]
    rows = []
    for name, s in result["estimators"].items():
        rows.append([name, _cell(s["sign_agreement"], ".2f"), _cell(s["spearman"]),
                     _cell(s["median_efficiency"], ".3g"), _cell(s["share_positive_efficiency"], ".2f"),
                     _cell(s["median_model_efficiency"], ".3g")])
    return head, rows


def _notes(result: dict[str, Any]) -> list[str]:
    sp = result["splits"]
    target = TARGET_NAMES[result["target"]]
    level = f"{100 * result['confidence']:.0f}%"
    notes = [
        (f"Direction `{result['direction']}`, target {target}; {result['n_runs']} run(s), {result['n_records']} "
         f"records, split used: heldout in {sp['heldout']} run(s), train (in-sample) in {sp['train']}. Each statistic "
         f"is computed within each run and averaged over runs (each run counts once), [{level} run-bootstrap "
         f"percentile interval, {result['n_resamples']} resamples] (runs/records behind it). Proxies are in their own units "
         f"(∝ c·lr), λ̂ in λ units (∝ 1/lr): only scale-free statistics compare them."),
    ]
    ls = result["lambda_star"]
    if ls["n_runs"]:
        notes.append(
            f"λ* vs λ̂ over {ls['n_runs']} run(s), {ls['n_records']} records: same sign "
            f"{fmt_interval(ls['same_sign'], '.2f')}, median |log10(λ*/λ̂)| {fmt_interval(ls['median_abs_log10_ratio'], '.2f')}"
            f" (both > 0, λ̂ interior: {ls['median_abs_log10_ratio']['n_records']} records; λ̂ at the search bound: "
            f"{ls['n_at_bound']}), realized efficiency of λ* "
            f"{fmt_interval(ls['median_efficiency'], '.3g')}, > 0 in {fmt_interval(ls['share_positive_efficiency'], '.2f')}")
    else:
        notes.append("λ* vs λ̂: no record carries λ̂ (lambda_hat)")
    t = result["taylor"]
    notes.append(
        f"Taylor residual over {t['n_runs']} run(s), {t['n_records']} records counted once: median "
        f"|realized − predicted|/|realized| {fmt_interval(t['median_relative_residual'], '.3g')}, 90th percentile "
        f"{fmt_interval(t['p90_relative_residual'], '.3g')}, sign(predicted) = sign(realized) in "
        f"{fmt_interval(t['sign_agreement'], '.2f')} of them (per-run statistics averaged over runs)")
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

