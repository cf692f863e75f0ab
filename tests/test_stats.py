"""Run-level statistics (decomp.results.stats) against independent implementations."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from decomp.results import stats


def _plain_cluster_bootstrap(groups, statistic, n_resamples, seed, confidence=0.95):
    """The definition, written out: resample run indices with replacement, one call each."""
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_resamples):
        picked = [groups[int(i)] for i in rng.integers(0, len(groups), size=len(groups))]
        reps.append(statistic(picked))
    alpha = (1 - confidence) / 2
    return np.percentile(reps, 100 * alpha), np.percentile(reps, 100 * (1 - alpha))


def _mean_of_medians(groups):
    return float(np.mean([np.median(g) for g in groups]))


def test_cluster_bootstrap_agrees_with_a_plain_loop():
    rng = np.random.default_rng(3)
    groups = [rng.normal(loc=rng.normal(), size=rng.integers(2, 40)) for _ in range(9)]
    res = stats.cluster_bootstrap(groups, _mean_of_medians, n_resamples=500, seed=11)
    low, high = _plain_cluster_bootstrap(groups, _mean_of_medians, 500, 11)
    assert res["value"] == pytest.approx(_mean_of_medians(groups))
    assert res["low"] == pytest.approx(low, rel=1e-12) and res["high"] == pytest.approx(high, rel=1e-12)
    assert res["n_runs"] == 9 and res["n_records"] == sum(len(g) for g in groups)
    # combine_runs is the same bootstrap with one value per run
    per_run = [np.median(g) for g in groups]
    comb = stats.combine_runs(per_run, n_resamples=500, seed=11)
    assert (comb["low"], comb["high"]) == pytest.approx((low, high), rel=1e-12)
    # the seed matters, and the default is 2000 resamples
    assert stats.N_RESAMPLES == 2000
    other = stats.cluster_bootstrap(groups, _mean_of_medians, n_resamples=500, seed=12)
    assert (other["low"], other["high"]) != (res["low"], res["high"])


def test_cluster_bootstrap_matches_the_t_interval_with_many_runs():
    """Many runs: the run bootstrap of the mean of run means is the normal-theory interval."""
    rng = np.random.default_rng(0)
    groups = [rng.normal(loc=rng.normal(scale=2.0), scale=0.5, size=20) for _ in range(400)]
    res = stats.cluster_bootstrap(groups, lambda gs: float(np.mean([g.mean() for g in gs])), seed=1)
    t = stats.t_interval([g.mean() for g in groups])
    width = t["high"] - t["low"]
    assert res["low"] == pytest.approx(t["low"], abs=0.1 * width)
    assert res["high"] == pytest.approx(t["high"], abs=0.1 * width)


def test_perfectly_correlated_records_give_the_between_run_interval():
    """Every record of a run equal to the run's value: the interval is the one of the per-run
    values (as wide as the spread between runs), not one shrunk by the record count."""
    values = np.array([0.1, 0.5, 0.9, 0.3, 0.7, 0.2])
    groups = [np.full(200, v) for v in values]
    res = stats.cluster_bootstrap(groups, lambda gs: float(np.mean(np.concatenate(gs))), seed=4)
    per_run = stats.combine_runs(values, seed=4)
    assert (res["low"], res["high"]) == pytest.approx((per_run["low"], per_run["high"]), rel=1e-12)
    t = stats.t_interval(values)
    assert res["high"] - res["low"] == pytest.approx(t["high"] - t["low"], rel=0.35)
    # a record-level bootstrap (what pooling records does) would be about √200 times narrower
    records = np.concatenate(groups)
    naive = sps.bootstrap((records,), np.mean, n_resamples=2000, method="percentile", rng=np.random.default_rng(4))
    naive_width = naive.confidence_interval.high - naive.confidence_interval.low
    assert res["high"] - res["low"] > 5 * naive_width


def test_fewer_than_two_runs_have_no_interval():
    one = stats.cluster_bootstrap([np.arange(50.0)], lambda gs: float(np.mean(gs[0])))
    assert one["value"] == pytest.approx(24.5) and math.isnan(one["low"]) and math.isnan(one["high"])
    assert math.isnan(stats.combine_runs([0.3])["low"])
    assert math.isnan(stats.combine_runs([])["value"])
    assert math.isnan(stats.t_interval([1.0])["low"])


def test_t_interval_matches_scipy():
    v = [0.2, -0.1, 0.4, 0.05, 0.3]
    t = stats.t_interval(v)
    low, high = sps.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=sps.sem(v))
    assert (t["low"], t["high"]) == pytest.approx((low, high))
    assert t["n"] == 5 and t["sd"] == pytest.approx(np.std(v, ddof=1))


def test_paired_difference_pairs_by_key():
    a = {0: 0.60, 1: 0.62, 2: 0.58, 3: 0.9, 4: math.nan}
    b = {0: 0.59, 1: 0.60, 2: 0.59, 5: 0.1, 4: 0.5}
    d = stats.paired_difference(a, b)
    assert d["keys"] == [0, 1, 2] and d["n"] == 3  # 3 and 5 unpaired, 4 not finite
    diffs = [0.01, 0.02, -0.01]
    assert d["differences"] == pytest.approx(diffs)
    ref = sps.t.interval(0.95, 2, loc=np.mean(diffs), scale=sps.sem(diffs))
    assert (d["low"], d["high"]) == pytest.approx(ref)


def test_per_run_helpers():
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 25]) == pytest.approx(sps.spearmanr([1, 2, 3, 4], [10, 20, 30, 25]).statistic)
    assert math.isnan(stats.spearman([1, 2], [3, 4])) and math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))
    assert stats.sign_agreement([1.0, -2.0, 0.0, 3.0], [2.0, 1.0, 0.0, 5.0]) == pytest.approx(0.5)  # 0 agrees with nothing
    assert stats.median([1.0, math.nan, 3.0, None, 2.0]) == 2.0
    assert stats.share_positive([1.0, -1.0, 2.0, math.nan]) == pytest.approx(2 / 3)
    assert stats.relative_residuals([2.0, 0.0, -1.0], [1.0, 1.0, -1.1]) == pytest.approx([0.5, 0.1])
    assert stats.abs_log10_ratio([10.0, -1.0, 1.0], [1.0, -10.0, 100.0]) == pytest.approx([1.0, 2.0])
    early, late, n = stats.early_late([1, 2, 3, 4, 5, 6], [6.0, 6.0, 4.0, 4.0, 1.0, 3.0])
    assert (early, late, n) == (6.0, 2.0, 4)
    assert stats.early_late([1, 2], [1.0, 2.0])[2] == 0


def test_finite():
    assert stats.finite(1) and stats.finite(2.5) and stats.finite(np.float32(1.0))
    assert not any(stats.finite(x) for x in (True, math.nan, math.inf, None, "1", np.nan))


def test_one_finite_helper_in_the_analysis_package():
    """``finite`` is defined once (stats.py); no module keeps a private copy."""
    package = Path(stats.__file__).parent
    defs = [(p.name, n.name) for p in package.glob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.FunctionDef) and n.name in ("finite", "_finite")]
    assert defs == [("stats.py", "finite")]


def test_interval_verdict_follows_the_interval_and_its_threshold():
    from decomp.results.stats import FAILS, HOLDS, INCONCLUSIVE, interval_verdict

    assert interval_verdict({"n": 5, "low": -0.01, "high": 0.03}, -0.02, min_n=3) == HOLDS
    assert interval_verdict({"n": 5, "low": -0.02, "high": 0.03}, -0.02, min_n=3) == HOLDS  # ≥
    assert interval_verdict({"n": 5, "low": 0.0, "high": 0.03}, 0.0, min_n=3, strict=True) == INCONCLUSIVE  # >
    assert interval_verdict({"n": 5, "low": -0.09, "high": -0.03}, -0.02, min_n=3) == FAILS
    assert interval_verdict({"n": 5, "low": -0.05, "high": 0.01}, -0.02, min_n=3) == INCONCLUSIVE
    assert interval_verdict({"n": 2, "low": 0.5, "high": 0.9}, 0.0, min_n=3) == INCONCLUSIVE
