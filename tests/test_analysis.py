"""Analysis of run directories: run-level statistics, figures, claims, damaged input."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats
from synthetic_runs import edit_records, write_run

from decomp.results.claims import (
    ACCURACY_MARGIN,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    ce_negative,
    evaluate_claims,
    occ_vs_detach,
)
from decomp.results.plots import FIGURES, make_figures
from decomp.results.report import build_report
from decomp.results.rundata import AnalysisError, load_runs
from decomp.results.stats import t_interval
from decomp.results.validate import (
    N_RESAMPLES,
    estimator_stats,
    format_table,
    taylor_stats,
    validate,
)
from decomp.training.cli import main

REGIMES = ("detach", "ce", "policy", "occ")


def _supporting(root, seeds=(0, 1, 2)):
    """Runs built to support every claim. The proxy is proportional to λ* (so it ranks λ̂ well
    within a run); only in the policy runs does λ* move within the run (elsewhere the proxy is
    constant and has no within-run ρ)."""
    def track(lam, i):
        return 0.01 * lam

    for s in seeds:
        write_run(root, "detach", s, final=0.60, estimate=track)
        write_run(root, "ce", s, cosine=lambda i, d: -0.2, c1=lambda i, d: -1e-3 if d in ("ce", "active") else 1e-3,
                  estimate=track)
        # policy: correlation decays tenfold, penalty stays
        write_run(root, "policy", s, c1=lambda i, d: 1e-3 * (1 - 0.9 * i / 30), estimate=track)
        write_run(root, "occ", s, final=0.61, estimate=track)
    return load_runs([root])


def _verdicts(runs):
    return {c.claim: c.verdict for c in evaluate_claims(runs)}


def _bootstrap_over_runs(per_run, seed=0):
    """The run bootstrap of the mean of per-run values, written out."""
    rng = np.random.default_rng(seed)
    v = np.asarray(per_run, dtype=float)
    reps = [v[rng.integers(0, v.size, size=v.size)].mean() for _ in range(N_RESAMPLES)]
    return np.percentile(reps, 2.5), np.percentile(reps, 97.5)


def test_estimator_statistics_are_per_run_then_combined(tmp_path):
    runs = _supporting(tmp_path)
    groups = [run.records("policy") for run in runs]
    s = estimator_stats(groups, "reference", "lambda_hat")
    per_rho, per_sign, per_eff = [], [], []
    for g in groups:
        est = np.array([r["coef_reference"] for r in g if math.isfinite(r["coef_reference"])])
        hat = np.array([r["lambda_hat"] for r in g if math.isfinite(r["coef_reference"])])
        if est.size >= 3 and np.ptp(est) > 0:
            per_rho.append(stats.spearmanr(est, hat).statistic)
        per_sign.append(np.mean((est != 0) & (np.sign(est) == np.sign(hat))))
        per_eff.append(np.median([r["gain_jvp_masked"] / r["gain_hat"] for r in g if math.isfinite(r["gain_hat"])]))
    assert s["n_runs"] == 12 and s["n_records"] == 12 * 30
    assert s["spearman"]["n_runs"] == len(per_rho) == 3  # the policy runs: elsewhere the proxy is constant
    assert s["spearman"]["value"] == pytest.approx(np.mean(per_rho))
    assert (s["spearman"]["low"], s["spearman"]["high"]) == pytest.approx(_bootstrap_over_runs(per_rho))
    assert s["sign_agreement"]["value"] == pytest.approx(np.mean(per_sign))
    # the proxy's realized efficiency only restates its scale (≈ 2·0.01 here): not reported
    assert not s["lambda_units"] and math.isnan(s["median_efficiency"]["value"])
    assert s["median_efficiency"]["not_reported"] == "n/a (not in λ units)"
    jvp = estimator_stats(groups, "jvp_masked", "lambda_hat")
    assert jvp["lambda_units"] and jvp["median_efficiency"]["value"] == pytest.approx(np.mean(per_eff))
    assert (jvp["median_efficiency"]["low"], jvp["median_efficiency"]["high"]) == pytest.approx(
        _bootstrap_over_runs(per_eff))
    # no magnitude of an estimate is compared with λ̂: no Pearson on raw values, no best constant
    assert not {"pearson", "best_constant", "median_efficiency_scaled"} & set(s)
    # jvp_pooled was built as −estimate: every sign disagrees
    assert estimator_stats(groups, "jvp_pooled")["sign_agreement"]["value"] == 0.0


def test_validation_interval_is_between_runs_when_records_repeat_the_run(tmp_path):
    """Each run's records all agree in sign with λ̂, or all disagree: the interval of the sign
    agreement is the one of the six per-run values (0 or 1), not of 180 records."""
    for s in range(6):
        sign = 1.0 if s % 2 == 0 else -1.0
        write_run(tmp_path, "policy", s, estimate=lambda lam, i, sg=sign: sg * 0.01 * lam)
    result = validate(load_runs([tmp_path]))
    agree = result["estimators"]["reference"]["sign_agreement"]
    per_run = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert agree["n_runs"] == 6 and agree["n_records"] == 180
    assert (agree["value"], agree["low"], agree["high"]) == pytest.approx(
        (0.5, *_bootstrap_over_runs(per_run)))
    assert agree["high"] - agree["low"] > 0.5  # a record-level interval would be about ±0.07
    assert result["target"] == "lambda_hat" and result["efficiency"] == "realized"


def test_validation_prefers_the_heldout_split_and_reads_estimators_as_data(tmp_path):
    write_run(tmp_path, "policy", 0, heldout=True)
    write_run(tmp_path, "policy", 1)
    edit_records(tmp_path / "policy-seed1", lambda r: r | {"coef_trust_region": r["lambda_star"] * 1.1})
    result = validate(load_runs([tmp_path]))
    assert [(r["seed"], r["split"], r["records"]) for r in result["runs"]] == [(0, "heldout", 30), (1, "train", 30)]
    assert result["splits"] == {"heldout": 1, "train": 1}
    assert list(result["estimators"])[:5] == ["reference", "masked", "pooled", "jvp_masked", "jvp_pooled"]
    assert result["estimators"]["trust_region"]["n_runs"] == 1
    text = format_table(result)
    assert "heldout in 1 run(s), train (in-sample) in 1" in text and "trust_region" in text


def test_older_runs_validate_against_lambda_star(tmp_path):
    """Schema-1 records (no split, no λ̂, copies without same_as) are read; the target falls back
    to λ* and the efficiency to the quadratic model's, and the table says so."""
    for s in range(3):
        write_run(tmp_path, "policy", s, new_fields=False, c1=lambda i, d: 1e-3 * (1 + i / 10))
    runs = load_runs([tmp_path])
    result = validate(runs)
    assert result["target"] == "lambda_star" and result["efficiency"] == "model"
    jvp = result["estimators"]["jvp_masked"]  # the proxies' efficiencies are not reported (not in λ units)
    assert jvp["median_model_efficiency"]["n_runs"] == 3 and jvp["median_efficiency"]["n_runs"] == 0
    assert result["lambda_star"]["n_runs"] == 0
    assert "no λ̂ in these records" in format_table(result)
    assert all(run.copies("policy") == 30 for run in runs)  # recognised by seconds == 0 and equal numbers


def test_shadow_copies_are_counted_once(tmp_path):
    """A ce run's ce direction is a copy of its active records (same_as: "active", or older runs:
    seconds 0 and equal numbers): the Taylor check counts each measurement once."""
    new = write_run(tmp_path / "new", "ce", 0)
    old = write_run(tmp_path / "old", "ce", 0, new_fields=False)
    for root in (new, old):
        run = load_runs([root])[0]
        assert len(run.decompositions) == 90 and run.copies("ce") == 30 and run.copies("policy") == 0
        assert len(run.unique_records()) == 60
        assert len(run.records("ce")) == 30  # a copy still stands for its direction
        t = validate([run])["taylor"]
        assert t["n_records"] == 60 and t["n_runs"] == 1
    # an older record with seconds 0 but other numbers is a measurement, not a copy
    edit_records(old, lambda r: r | {"correlation": r["correlation"] * 2} if r["direction"] == "ce" and r["step"] == 1
                 else r)
    assert load_runs([old])[0].copies("ce") == 29
    # same_as is trusted when present
    edit_records(new, lambda r: r | {"same_as": ""} if r["direction"] == "ce" and r["step"] <= 5 else r)
    assert load_runs([new])[0].copies("ce") == 25


def test_taylor_statistics():
    recs = [{"realized": 2.0, "predicted": 1.0}, {"realized": -1.0, "predicted": -1.1}, {"realized": 0.0, "predicted": 0.0},
            {"realized": 1.0, "predicted": -1.0}]
    t = taylor_stats(recs)
    assert t["n"] == 3  # the record that does not move J is left out
    rel = np.array([0.5, 0.1, 2.0])
    assert t["median_relative_residual"] == pytest.approx(np.median(rel))
    assert t["p90_relative_residual"] == pytest.approx(np.percentile(rel, 90))
    assert t["sign_agreement"] == pytest.approx(2 / 3)


def test_every_figure_is_written(tmp_path):
    runs = _supporting(tmp_path / "runs", seeds=(0, 1))  # two seeds: bands are drawn
    paths = make_figures(runs, tmp_path / "figs", pdf=True)
    assert {p.name for p in paths} == {f"{n}.{ext}" for n in FIGURES for ext in ("png", "pdf")}
    for p in paths:
        assert p.stat().st_size > 5000, p


def test_claims_hold_on_supporting_data(tmp_path):
    assert set(_verdicts(_supporting(tmp_path)).values()) == {HOLDS}


@pytest.mark.parametrize(
    "claim,builder",
    [
        ("detach: both terms zero", lambda root: write_run(root, "detach", 5, c1=lambda i, d: 1e-3)),
        ("ce: correlation weak or negative, net effect negative",
         lambda root: [write_run(root, "ce", 10 + k, cosine=lambda i, d: 0.6) for k in range(6)]),
        ("policy: correlation decays while penalty persists",
         lambda root: [write_run(root, "policy", 10 + k, c1=lambda i, d: 1e-3 * (0.2 + i / 30)) for k in range(4)]),
        ("OCC matches or beats detach", lambda root: [write_run(root, "occ", k, final=0.4) for k in range(3)]),
        ("the proxy tracks the optimal coefficient",
         lambda root: [write_run(root, r, 20, estimate=lambda lam, i: -lam * 0.01 - 1e-4 * i, c1=lambda i, d: 1e-3 * (1 + i / 10))
                       for r in REGIMES]),
    ],
)
def test_each_claim_flips_when_the_data_contradicts_it(tmp_path, claim, builder):
    root = tmp_path / "runs"
    root.mkdir()
    if claim == "detach: both terms zero":
        # a "detach" run whose active direction moves J: what a leaking detach would record
        write_run(root, "ce", 0)
        out = builder(root)
        lines = [json.loads(line) for line in (out / "decomposition.jsonl").read_text().splitlines()]
        for r in lines:
            if r["direction"] == "active":
                r["correlation"] = 1e-9
        with open(out / "decomposition.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines)
        runs = load_runs([root])
    elif claim == "OCC matches or beats detach":
        for k in range(3):
            write_run(root, "detach", k, final=0.7)
        builder(root)
        runs = load_runs([root])
    elif claim == "the proxy tracks the optimal coefficient":
        builder(root)
        runs = load_runs([root])
    else:
        builder(root)
        runs = load_runs([root])
    assert _verdicts(runs)[claim] == FAILS


def test_inconclusive_without_enough_data(tmp_path):
    write_run(tmp_path, "occ", 0)
    write_run(tmp_path, "detach", 0)
    v = _verdicts(load_runs([tmp_path]))
    assert v["OCC matches or beats detach"] == INCONCLUSIVE  # one seed
    assert v["policy: correlation decays while penalty persists"] == INCONCLUSIVE  # no policy run


def test_one_seed_per_regime_is_inconclusive(tmp_path):
    """Data that support every claim with three seeds: with one seed per regime, every claim
    about regimes or seeds is inconclusive; the deterministic detach check still holds."""
    claims = {c.claim: c for c in evaluate_claims(_supporting(tmp_path, seeds=(0,)))}
    occ = claims["OCC matches or beats detach"]
    decay = claims["policy: correlation decays while penalty persists"]
    assert occ.verdict == decay.verdict == INCONCLUSIVE
    assert (occ.n_runs, occ.n_records) == (2, 6)  # one pair of runs, three evaluations each
    assert (decay.n_runs, decay.n_records) == (1, 20)  # one run, its first and last third
    assert claims["ce: correlation weak or negative, net effect negative"].verdict == INCONCLUSIVE
    assert claims["the proxy tracks the optimal coefficient"].verdict == INCONCLUSIVE
    assert claims["detach: both terms zero"].verdict == HOLDS


def test_every_claim_states_its_statistic_interval_rule_and_n(tmp_path):
    for c in evaluate_claims(_supporting(tmp_path)):
        assert c.n_runs >= 3 and c.n_records > c.n_runs and c.rule and c.statistic, c
        if c.claim != "detach: both terms zero":  # deterministic: no interval
            assert c.low <= c.value <= c.high and "[" in c.interval, c
            assert "≥ 3" in c.rule and "t-interval" in c.rule, c


def _occ_detach(root, occ_finals):
    for k, final in enumerate(occ_finals):
        write_run(root, "detach", k, final=0.7)
        write_run(root, "occ", k, final=final)
    return load_runs([root])


@pytest.mark.parametrize("occ_finals,verdict", [
    ((0.70, 0.71, 0.69), HOLDS),  # mean difference 0, lower bound −1.7 points
    ((0.70, 0.73, 0.67), INCONCLUSIVE),  # the same mean, lower bound −5.0 points
    ((0.60, 0.61, 0.59), FAILS),  # upper bound below −2 points
])
def test_occ_verdict_follows_the_lower_bound_not_the_mean(tmp_path, occ_finals, verdict):
    runs = _occ_detach(tmp_path, occ_finals)
    claim = occ_vs_detach(runs)
    by = {(r.regime, r.seed): r.final_accuracy_mean() for r in runs}
    diffs = [by[("occ", k)] - by[("detach", k)] for k in range(3)]
    t = t_interval(diffs)
    assert (claim.value, claim.low, claim.high) == pytest.approx((t["value"], t["low"], t["high"]))
    assert claim.verdict == verdict
    if verdict == INCONCLUSIVE:
        assert claim.low < -ACCURACY_MARGIN < claim.high


def _ce_runs(root, c1s):
    for k, c in enumerate(c1s):
        write_run(root, "ce", k, cosine=lambda i, d: -0.2, c1=lambda i, d, c=c: c if d in ("ce", "active") else 1e-3)
    return load_runs([root])


@pytest.mark.parametrize("c1s,verdict", [
    ((-1e-3, -1.2e-3, -0.8e-3), HOLDS),
    ((-1e-3, -1.2e-3, 1.5e-3), INCONCLUSIVE),  # one run's ΔJ_MTP > 0: the interval straddles 0
])
def test_ce_verdict_follows_the_interval_of_per_run_medians(tmp_path, c1s, verdict):
    runs = _ce_runs(tmp_path, c1s)
    claim = ce_negative(runs)
    medians = [np.median([r["realized"] for r in run.records("ce")]) for run in runs]
    t = t_interval(medians)
    assert claim.n_runs == 3 and claim.n_records == 90
    assert (claim.value, claim.low, claim.high) == pytest.approx((t["value"], t["low"], t["high"]))
    assert claim.verdict == verdict
    assert (claim.high < 0) == (verdict == HOLDS)


def test_final_accuracy_is_the_mean_of_the_last_evaluations(tmp_path):
    run = load_runs([write_run(tmp_path, "occ", 0, n=70, warm=0.4, final=0.6)])[0]
    evals = [0.4 + 0.2 * i / 70 for i in range(10, 71, 10)]
    assert run.evaluations == pytest.approx(evals)
    assert run.final_accuracy == pytest.approx(evals[-1])
    assert run.final_accuracy_mean() == pytest.approx(np.mean(evals[-5:]))
    assert run.final_accuracy_mean(20) == pytest.approx(np.mean(evals))  # fewer than k: all of them


def test_damaged_input_is_skipped_with_a_warning_naming_file_and_line(tmp_path):
    good = write_run(tmp_path, "ce", 0)
    with open(good / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "regime": "c')  # truncated last line
    lines = (good / "decomposition.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('"correlation"', '"corr"')  # a missing field on line 3
    (good / "decomposition.jsonl").write_text("\n".join(lines) + "\n")
    old = write_run(tmp_path, "policy", 0)
    (old / "config.json").write_text('{"config": {"regime": "policy", "seed": 0}, "schema_version": 0}')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = load_runs([tmp_path])
    messages = [str(w.message) for w in caught]
    assert any(f"{good / 'metrics.jsonl'}:32" in m and "not valid JSON" in m for m in messages), messages
    assert any(f"{good / 'decomposition.jsonl'}:3" in m and "missing correlation" in m for m in messages), messages
    assert any(f"{old / 'config.json'}:1" in m and "schema version 0" in m for m in messages), messages
    assert [r.regime for r in runs] == ["ce"]
    assert len(runs[0].decompositions) == 3 * 30 - 1
    with pytest.raises(AnalysisError, match="no run directories"):
        load_runs([tmp_path / "nothing-here"])


def test_cli_plot_validate_report(tmp_path, capsys):
    _supporting(tmp_path / "runs")
    assert main(["validate", str(tmp_path / "runs"), "--out", str(tmp_path / "validation.json")]) == 0
    out = capsys.readouterr().out
    assert "Spearman" in out and "Taylor residual" in out

    data = json.loads((tmp_path / "validation.json").read_text())
    assert set(data["estimators"]) == {"reference", "masked", "pooled", "jvp_masked", "jvp_pooled"}
    assert data["n_runs"] == 12 and data["estimators"]["reference"]["spearman"]["n_runs"] == 3
    assert main(["plot", str(tmp_path / "runs"), "--out", str(tmp_path / "figs")]) == 0
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report.md"),
                 "--figures", str(tmp_path / "figs")]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## The paper's claims on this data" in report and "**holds**" in report
    assert "| claim | statistic | 95% interval | rule | runs | records | verdict |" in report
    assert "![training](figs/training.png)" in report
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run directories" in err[0]


def test_report_accuracy_table_uses_mean_and_sd(tmp_path):
    for s, final in zip((0, 1, 2), (0.5, 0.6, 0.7), strict=True):
        write_run(tmp_path, "detach", s, final=final)
    text = build_report(load_runs([tmp_path]), tmp_path / "r.md")
    sd = 100 * np.std([0.5, 0.6, 0.7], ddof=1)
    assert f"60.0% ± {sd:.1f}" in text
    assert math.isclose(sd, 10.0)


def test_figures_of_sparse_runs(tmp_path):
    """Two instrumented updates, the policy direction only, no sweeps or eigenvalues (what a short
    run of a real LM writes): every figure is still drawn."""
    for regime in ("detach", "occ"):
        out = write_run(tmp_path / "runs", regime, 0, n=2)
        rows = [json.loads(line) for line in (out / "decomposition.jsonl").read_text().splitlines()]
        (out / "decomposition.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["direction"] == "policy"))
        (out / "sweeps.jsonl").write_text("")
        (out / "curvature.jsonl").write_text("")
    runs = load_runs([tmp_path / "runs"])
    paths = make_figures(runs, tmp_path / "figs")
    assert len(paths) == len(FIGURES) and all(p.stat().st_size > 2000 for p in paths)
    text = build_report(runs, tmp_path / "r.md", tmp_path / "figs")
    assert "inconclusive" in text


def test_a_one_seed_report_says_what_it_can_conclude(tmp_path):
    from decomp.results.report import build_report, scope_note

    write_run(tmp_path, "detach", 0, n=6)
    write_run(tmp_path, "occ", 0, n=6)
    runs = load_runs([tmp_path])
    note = scope_note(runs)
    assert note and "cannot tell regimes apart" in note[0] and "detach: 1 seed(s)" in note[0]
    assert "What these runs can conclude" in build_report(runs, tmp_path / "r.md")
    for seed in (1, 2):
        write_run(tmp_path, "detach", seed, n=6)
        write_run(tmp_path, "occ", seed, n=6)
    assert scope_note(load_runs([tmp_path])) == []


def test_a_run_directory_given_twice_counts_once(tmp_path):
    for s in range(3):
        write_run(tmp_path, "policy", s)
    one = tmp_path / "policy-seed0"
    assert one.is_dir()
    (tmp_path / "link").symlink_to(one)
    runs = load_runs([tmp_path, one, str(one) + "/", tmp_path / "link"])
    assert sorted(r.seed for r in runs) == [0, 1, 2]
