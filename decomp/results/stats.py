"""Run-level statistics: the unit of replication is the run, never the record.

Records of one run are consecutive instrumented updates of one training trajectory: they are
autocorrelated, and a statistic pooled over records (or an interval that resamples records)
pretends to have far more independent observations than there are. The functions here take
data grouped by run and

- summarise each run by one number (a median, a share, a within-run Spearman ρ, an early/late
  ratio), then combine the per-run numbers across runs (:func:`combine_runs`, each run counts
  once), with an interval from a bootstrap that resamples whole runs (:func:`cluster_bootstrap`)
  or a Student t-interval over runs (:func:`t_interval`);
- compare two regimes by paired seed differences (:func:`paired_difference`).

Runs that share one policy trajectory (:func:`decomp.results.rundata.cluster_of`) are one
*cluster*: :func:`combine_runs` and :func:`cluster_t_interval` first average the runs of a cluster,
``v_k = mean_{i∈k} x_i``, then combine the clusters, each counting once.

Every function is pure (NumPy/SciPy only, seeded where random) and returns plain floats and
dicts that JSON can hold; ``nan`` marks what is undefined (too few runs, a constant sample).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

N_RESAMPLES = 2000
CONFIDENCE = 0.95
NAN = math.nan


def finite(x: Any) -> bool:
    """``x`` is a real number (not a bool) and finite: the one test of a usable value."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_)) \
        and math.isfinite(x)


def finite_array(values: Sequence[Any]) -> np.ndarray:
    """The finite entries of ``values`` as a float array (everything else dropped)."""
    return np.array([float(v) for v in values if finite(v)], dtype=float)


def _alpha(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return (1.0 - confidence) / 2.0


def cluster_bootstrap(
    groups: Sequence[Any],
    statistic: Callable[[list[Any]], float],
    *,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> dict[str, float]:
    """``statistic`` of grouped data with a percentile interval from resampling whole groups.

    ``groups`` holds one entry per run (for instance the array of that run's records);
    ``statistic(list_of_groups)`` returns a number. Each resample draws ``len(groups)`` runs
    with replacement (``rng.integers(0, k, size=k)`` from ``np.random.default_rng(seed)``, one
    call per resample) and evaluates ``statistic`` on them; the interval is the
    ``(1 ± confidence)/2`` percentiles (``np.percentile``, linear) of the finite resampled
    values. Records never move between runs, so the interval reflects the spread between
    runs however many records each holds. Fewer than 2 runs, or fewer than half the resamples
    finite, give a ``nan`` interval.

    Returns ``{"value", "low", "high", "n_runs", "n_records"}`` (``n_records``: the summed
    lengths of the groups, ``nan`` when they have none).
    """
    groups = list(groups)
    k = len(groups)
    value = float(statistic(groups)) if k else NAN
    sized = all(hasattr(g, "__len__") for g in groups)
    out = {"value": value, "low": NAN, "high": NAN, "n_runs": k,
           "n_records": sum(len(g) for g in groups) if sized else NAN}
    if k < 2 or n_resamples < 1:
        return out
    reps = np.empty(n_resamples, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nan-means of resamples without finite values
        for b, idx in enumerate(resample_indices(k, n_resamples, seed)):
            reps[b] = statistic([groups[i] for i in idx])
    return out | percentile_interval(reps, confidence)


def resample_indices(k: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """``n_resamples`` rows of ``k`` run indices drawn with replacement: row ``b`` is the
    ``b``-th call of ``rng.integers(0, k, size=k)`` on ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return np.array([rng.integers(0, k, size=k) for _ in range(n_resamples)], dtype=np.int64).reshape(n_resamples, k)


def percentile_interval(reps: np.ndarray, confidence: float = CONFIDENCE) -> dict[str, float]:
    """The ``(1 ± confidence)/2`` percentiles of the finite resampled values ``reps``
    (``nan`` when fewer than half of them are finite)."""
    alpha = _alpha(confidence)
    reps = np.asarray(reps, dtype=float)
    kept = reps[np.isfinite(reps)]
    if kept.size == 0 or kept.size < reps.size / 2:
        return {"low": NAN, "high": NAN}
    low, high = np.percentile(kept, [100 * alpha, 100 * (1 - alpha)])
    return {"low": float(low), "high": float(high)}


def _center(values: np.ndarray, how: str) -> float:
    if values.size == 0:
        return NAN
    if how == "mean":
        return float(np.mean(values))
    if how == "median":
        return float(np.median(values))
    raise ValueError(f"how must be 'mean' or 'median', got {how!r}")


def cluster_means(per_run: Sequence[Any], clusters: Sequence[Hashable] | None = None) -> tuple[np.ndarray, int]:
    """One value per cluster, ``v_k = mean_{i∈k} x_i`` over its runs' finite values (clusters in
    order of first appearance; a cluster without a finite value is left out), and the number of
    runs behind them. ``clusters=None``: every run is its own cluster."""
    if clusters is None:
        values = finite_array(per_run)
        return values, int(values.size)
    if len(clusters) != len(per_run):
        raise ValueError(f"clusters has {len(clusters)} entries for {len(per_run)} runs")
    grouped: dict[Hashable, list[float]] = {}
    for value, key in zip(per_run, clusters, strict=True):
        if finite(value):
            grouped.setdefault(key, []).append(float(value))
    return np.array([np.mean(v) for v in grouped.values()], dtype=float), sum(len(v) for v in grouped.values())


def combine_runs(
    per_run: Sequence[float],
    *,
    how: str = "mean",
    n_records: int | None = None,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    clusters: Sequence[Hashable] | None = None,
) -> dict[str, float]:
    """Combine one statistic per run into one number: the ``mean`` (or ``median``) over the runs
    whose statistic is finite, with a run-bootstrap percentile interval (:func:`cluster_bootstrap`
    with one value per run). With ``clusters`` (one key per run), the runs of a cluster are
    averaged first (:func:`cluster_means`) and the clusters are combined and resampled instead.
    ``n_records`` (the records behind the per-run values) is passed through for the report.

    Returns ``{"value", "low", "high", "n_runs", "n_clusters", "n_records"}``.
    """
    values, n_runs = cluster_means(per_run, clusters)
    k = int(values.size)
    out = {"value": _center(values, how), "low": NAN, "high": NAN, "n_runs": n_runs, "n_clusters": k,
           "n_records": int(n_records) if n_records is not None else NAN}
    if k < 2 or n_resamples < 1:
        return out
    # the same resamples as cluster_bootstrap(values, ...), evaluated at once
    drawn = values[resample_indices(k, n_resamples, seed)]
    reps = drawn.mean(axis=1) if how == "mean" else np.median(drawn, axis=1)
    return out | percentile_interval(reps, confidence)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean of the finite ``values`` with the two-sided Student t-interval
    ``mean ± t_{1−α/2, n−1}·sd/√n`` (sd with ``ddof=1``); ``nan`` bounds for fewer than 2 values.

    Returns ``{"value", "low", "high", "sd", "n"}``.
    """
    v = finite_array(values)
    n = int(v.size)
    mean = float(np.mean(v)) if n else NAN
    if n < 2:
        return {"value": mean, "low": NAN, "high": NAN, "sd": NAN, "n": n}
    sd = float(np.std(v, ddof=1))
    half = float(stats.t.ppf(1 - _alpha(confidence), n - 1)) * sd / math.sqrt(n)
    return {"value": mean, "low": mean - half, "high": mean + half, "sd": sd, "n": n}


def cluster_t_interval(values: Sequence[float], clusters: Sequence[Hashable] | None = None,
                       confidence: float = CONFIDENCE) -> dict[str, float]:
    """:func:`t_interval` over clusters: the mean of the cluster means ``v_k``
    (:func:`cluster_means`), ``n`` the clusters and ``n_runs`` the runs behind them."""
    means, n_runs = cluster_means(values, clusters)
    return t_interval(means, confidence) | {"n_runs": n_runs}


def paired_difference(
    a: Mapping[Any, float], b: Mapping[Any, float], confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """``a − b`` over the keys (seeds) both hold with finite values, summarised by
    :func:`t_interval`: ``low`` is the lower end of the two-sided interval (a one-sided
    ``1 − α/2`` lower bound on the mean difference).

    Returns ``{"value", "low", "high", "sd", "n", "keys", "differences"}``.
    """
    keys = sorted(k for k in a if k in b and finite(a[k]) and finite(b[k]))
    diffs = [float(a[k]) - float(b[k]) for k in keys]
    return t_interval(diffs, confidence) | {"keys": keys, "differences": diffs}


HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
NO_SIGNAL = "no signal"  # the target's own split-half reliability is too low to judge anything against it
Z_DISTINGUISHABLE = 2.0  # |term/term_se| at which a record's term is distinguishable from 0


def interval_verdict(d: Mapping[str, Any], threshold: float, *, min_n: int, strict: bool = False) -> str:
    """A claim that the mean exceeds ``threshold``, judged by its interval ``d`` (``n``, ``low``,
    ``high``): holds when the low end is above it (``≥``; ``>`` when ``strict``), does not hold
    when the high end is below it, inconclusive with fewer than ``min_n`` values or an interval
    that straddles it."""
    if d["n"] < min_n:
        return INCONCLUSIVE
    if (d["low"] > threshold) if strict else (d["low"] >= threshold):
        return HOLDS
    if d["high"] < threshold:
        return FAILS
    return INCONCLUSIVE


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ of paired samples (average ranks for ties); ``nan`` for fewer than 3 pairs
    or a constant sample."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return NAN
    return float(stats.spearmanr(x, y).statistic)


def sign_agreement(estimate: Sequence[float], target: Sequence[float]) -> float:
    """Share of pairs with ``sign(estimate) == sign(target)``; an estimate of 0 agrees with
    nothing. ``nan`` when empty."""
    e, t = np.asarray(estimate, dtype=float), np.asarray(target, dtype=float)
    if e.size == 0:
        return NAN
    return float(np.mean((e != 0) & (np.sign(e) == np.sign(t))))


def median(values: Sequence[float]) -> float:
    """Median of the finite values (``nan`` when none)."""
    v = finite_array(values)
    return float(np.median(v)) if v.size else NAN


def share_positive(values: Sequence[float]) -> float:
    """Share of the finite values that are > 0 (``nan`` when none)."""
    v = finite_array(values)
    return float(np.mean(v > 0)) if v.size else NAN


def relative_residuals(realized: Sequence[float], predicted: Sequence[float]) -> np.ndarray:
    """``|realized − predicted| / |realized|`` where ``realized ≠ 0`` (the finite ones)."""
    r, p = np.asarray(realized, dtype=float), np.asarray(predicted, dtype=float)
    keep = np.isfinite(r) & np.isfinite(p) & (r != 0)
    return np.abs(r[keep] - p[keep]) / np.abs(r[keep])


def abs_log10_ratio(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """``|log10(a/b)|`` over the pairs where both are finite and positive (orders of magnitude
    between two quantities in the same units)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
    return np.abs(np.log10(a[keep] / b[keep]))


def early_late(steps: Sequence[float], values: Sequence[float]) -> tuple[float, float, int]:
    """Means of ``values`` over the first and last third of the distinct ``steps`` (one run),
    and how many values went into them; ``(nan, nan, 0)`` with fewer than 3 distinct steps."""
    s, v = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    keep = np.isfinite(s) & np.isfinite(v)
    s, v = s[keep], v[keep]
    distinct = np.unique(s)
    if distinct.size < 3:
        return NAN, NAN, 0
    k = distinct.size // 3
    early, late = np.isin(s, distinct[:k]), np.isin(s, distinct[-k:])
    return float(np.mean(v[early])), float(np.mean(v[late])), int(early.sum() + late.sum())


def term_z(record: Mapping[str, Any], term: str) -> float:
    """``z = term / term_se`` of one record (``nan`` where the record has no finite, positive
    ``<term>_se``: older runs, or ``group_errors`` off)."""
    value, se = record.get(term), record.get(f"{term}_se")
    if finite(value) and finite(se) and se == 0 and value == 0:
        return 0.0  # a term that is exactly 0 (a detached direction) is not distinguishable from 0
    return float(value) / float(se) if finite(value) and finite(se) and se > 0 else NAN


def distinguishable_share(records: Sequence[Mapping[str, Any]], term: str,
                          threshold: float = Z_DISTINGUISHABLE) -> tuple[float, int]:
    """Share of the records with a finite ``z`` (:func:`term_z`) whose ``|z| ≥ threshold``, and
    how many records have one (``(nan, 0)`` when none does)."""
    z = finite_array([term_z(r, term) for r in records])
    return (float(np.mean(np.abs(z) >= threshold)) if z.size else NAN), int(z.size)


def fmt(x: Any, spec: str = ".3g") -> str:
    """``x`` formatted with ``spec``, or ``nan`` when it is not a finite number."""
    return format(x, spec) if finite(x) else "nan"


def fmt_interval(d: Mapping[str, Any], spec: str = "+.2f") -> str:
    """``value [low, high]`` of a statistic dict."""
    return f"{fmt(d.get('value'), spec)} [{fmt(d.get('low'), spec)}, {fmt(d.get('high'), spec)}]"
