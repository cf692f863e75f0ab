"""OCC estimators validated against the exact ``λ*``, and the Taylor residual (DESIGN.md §4).

For each estimator, over every instrumented update of the chosen direction (default ``policy``,
the MTP loss OCC scales) where both ``λ*`` and the estimate are finite:

- ``sign_agreement``: share of updates with ``sign(estimate) == sign(λ*)`` (an estimate of 0
  agrees with nothing);
- ``spearman``/``pearson`` with 95% percentile bootstrap intervals (``scipy.stats.bootstrap``,
  paired resampling of updates, 2000 resamples, seeded);
- ``median_efficiency`` and ``share_positive_efficiency`` of ``gain(λ_est)/gain(λ*)``;
- ``best_constant``: ``c* = Σ est·λ* / Σ est²``, the least-squares scale mapping the estimate
  onto ``λ*``, and ``median_efficiency_scaled``, the median efficiency of ``c*·estimate``.

Taylor residual, over every record whose MTP displacement moves ``J`` (``realized`` or
``predicted`` non-zero): the median and 90th percentile of ``|realized − predicted| / |realized|``
and the share of records where ``predicted`` and ``realized`` have the same sign.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from decomp.analysis.rundata import ESTIMATORS, Run

N_RESAMPLES = 2000
CONFIDENCE = 0.95


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pearson(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return stats.pearsonr(a, b, axis=axis).statistic


def _spearman(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    # Spearman's ρ is Pearson's r of the ranks (average ranks for ties), batched for bootstrap
    return _pearson(stats.rankdata(a, axis=axis), stats.rankdata(b, axis=axis), axis)


def correlation_with_ci(x: np.ndarray, y: np.ndarray, kind: str, seed: int = 0) -> dict[str, float]:
    """Spearman or Pearson correlation of paired samples with a percentile bootstrap interval
    (``nan`` for fewer than 3 samples or a constant sample)."""
    fn = {"spearman": _spearman, "pearson": _pearson}[kind]
    nan = {"value": math.nan, "low": math.nan, "high": math.nan}
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return nan
    with warnings.catch_warnings():
        # resamples of a few points are often constant: their correlation is undefined (nan)
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        value = float(fn(x, y))
        res = stats.bootstrap(
            (x, y), fn, paired=True, vectorized=True, n_resamples=N_RESAMPLES,
            confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(seed),
        )
    return {"value": value, "low": float(res.confidence_interval.low), "high": float(res.confidence_interval.high)}


def _gain(lam: np.ndarray, c1x1: np.ndarray, p1: np.ndarray) -> np.ndarray:
    return lam * c1x1 - lam * lam * p1


def estimator_stats(records: list[dict[str, Any]], estimator: str, seed: int = 0) -> dict[str, Any]:
    """The statistics of the module docstring for one estimator over ``records``."""
    rows = [r for r in records if _finite(r.get("lambda_star")) and _finite(r.get(f"coef_{estimator}"))]
    out: dict[str, Any] = {"n": len(rows)}
    if not rows:
        return out | {"sign_agreement": math.nan, "spearman": correlation_with_ci(np.zeros(0), np.zeros(0), "spearman"),
                      "pearson": correlation_with_ci(np.zeros(0), np.zeros(0), "pearson"),
                      "median_efficiency": math.nan, "share_positive_efficiency": math.nan,
                      "best_constant": math.nan, "median_efficiency_scaled": math.nan}
    est = np.array([r[f"coef_{estimator}"] for r in rows], dtype=float)
    lam = np.array([r["lambda_star"] for r in rows], dtype=float)
    c1x1 = np.array([r["correlation_unit"] + r["cross_unit"] for r in rows], dtype=float)
    p1 = np.array([r["penalty_unit"] for r in rows], dtype=float)
    best = _gain(lam, c1x1, p1)
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = _gain(est, c1x1, p1) / best
    eff = eff[np.isfinite(eff)]
    denom = float(np.sum(est * est))
    c_star = float(np.sum(est * lam) / denom) if denom > 0 else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        eff_scaled = _gain(c_star * est, c1x1, p1) / best if math.isfinite(c_star) else np.array([])
    eff_scaled = eff_scaled[np.isfinite(eff_scaled)]
    return out | {
        "sign_agreement": float(np.mean(np.sign(est) == np.sign(lam))),
        "spearman": correlation_with_ci(est, lam, "spearman", seed),
        "pearson": correlation_with_ci(est, lam, "pearson", seed),
        "median_efficiency": float(np.median(eff)) if eff.size else math.nan,
        "share_positive_efficiency": float(np.mean(eff > 0)) if eff.size else math.nan,
        "best_constant": c_star,
        "median_efficiency_scaled": float(np.median(eff_scaled)) if eff_scaled.size else math.nan,
    }


def taylor_stats(records: list[dict[str, Any]]) -> dict[str, float]:
    """How well ``C + X − P`` predicts the realized change (module docstring)."""
    rows = [r for r in records if _finite(r["realized"]) and _finite(r["predicted"]) and (r["realized"] or r["predicted"])]
    if not rows:
        return {"n": 0, "median_relative_residual": math.nan, "p90_relative_residual": math.nan, "sign_agreement": math.nan}
    real = np.array([r["realized"] for r in rows])
    pred = np.array([r["predicted"] for r in rows])
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(real - pred) / np.abs(real)
    rel = rel[np.isfinite(rel)]
    return {
        "n": len(rows),
        "median_relative_residual": float(np.median(rel)) if rel.size else math.nan,
        "p90_relative_residual": float(np.percentile(rel, 90)) if rel.size else math.nan,
        "sign_agreement": float(np.mean(np.sign(real) == np.sign(pred))),
    }


def validate(runs: list[Run], direction: str = "policy", seed: int = 0) -> dict[str, Any]:
    """Estimator statistics for ``direction`` pooled over ``runs``, and the Taylor residual over
    every direction."""
    records = [r for run in runs for r in run.records(direction)]
    everything = [r for run in runs for r in run.decompositions]
    return {
        "direction": direction,
        "runs": [str(run.path) for run in runs],
        "records": len(records),
        "estimators": {name: estimator_stats(records, name, seed) for name in ESTIMATORS},
        "taylor": taylor_stats(everything),
    }


def _fmt(x: float, spec: str = ".3f") -> str:
    return "nan" if not _finite(x) else format(x, spec)


def _ci(d: dict[str, float]) -> str:
    return f"{_fmt(d['value'], '+.2f')} [{_fmt(d['low'], '+.2f')}, {_fmt(d['high'], '+.2f')}]"


def format_table(result: dict[str, Any], markdown: bool = False) -> str:
    """The validation table, plain text or Markdown."""
    head = ["estimator", "n", "sign agree", "Spearman [95% CI]", "Pearson [95% CI]", "median eff",
            "eff > 0", "c*", "median eff (c*)"]
    rows = []
    for name, s in result["estimators"].items():
        if s["n"] == 0:
            rows.append([name, "0"] + ["nan"] * 7)
            continue
        rows.append([
            name, str(s["n"]), _fmt(s["sign_agreement"], ".2f"), _ci(s["spearman"]), _ci(s["pearson"]),
            _fmt(s["median_efficiency"], ".3g"), _fmt(s["share_positive_efficiency"], ".2f"),
            _fmt(s["best_constant"], ".3g"), _fmt(s["median_efficiency_scaled"], ".3g"),
        ])
    t = result["taylor"]
    foot = (f"Taylor residual over {t['n']} records: median |realized − predicted|/|realized| = "
            f"{_fmt(t['median_relative_residual'], '.3g')}, 90th percentile {_fmt(t['p90_relative_residual'], '.3g')}, "
            f"sign(predicted) = sign(realized) in {_fmt(t['sign_agreement'], '.0%')} of them")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + "\n\n" + foot + "."
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines) + "\n" + foot


def write_json(result: dict[str, Any], path: Path) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    Path(path).write_text(json.dumps(clean(result), indent=2, allow_nan=False))
