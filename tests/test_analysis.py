"""Analysis of run directories: statistics against SciPy/NumPy, figures, claims, damaged input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats
from synthetic_runs import write_run

from decomp.analysis.claims import FAILS, HOLDS, INCONCLUSIVE, evaluate_claims
from decomp.analysis.plots import FIGURES, make_figures
from decomp.analysis.report import build_report
from decomp.analysis.rundata import AnalysisError, load_runs
from decomp.analysis.validate import N_RESAMPLES, estimator_stats, taylor_stats
from decomp.training.cli import main

REGIMES = ("detach", "ce", "policy", "occ")


def _supporting(root, seeds=(0, 1, 2)):
    """Runs built to support every claim."""
    for s in seeds:
        write_run(root, "detach", s, final=0.60)
        write_run(root, "ce", s, cosine=lambda i, d: -0.2, c1=lambda i, d: -1e-3 if d in ("ce", "active") else 1e-3)
        # policy: correlation decays tenfold, penalty stays
        write_run(root, "policy", s, c1=lambda i, d: 1e-3 * (1 - 0.9 * i / 30))
        write_run(root, "occ", s, final=0.61)
    return load_runs([root])


def _verdicts(runs):
    return {c.claim: c.verdict for c in evaluate_claims(runs)}


def test_estimator_statistics_match_scipy_and_numpy(tmp_path):
    runs = _supporting(tmp_path, seeds=(0,))
    records = [r for run in runs for r in run.records("policy")]
    s = estimator_stats(records, "reference")
    est = np.array([r["coef_reference"] for r in records])
    lam = np.array([r["lambda_star"] for r in records])
    assert s["n"] == len(records) == 4 * 30
    assert s["sign_agreement"] == pytest.approx(np.mean(np.sign(est) == np.sign(lam)))
    assert s["spearman"]["value"] == pytest.approx(stats.spearmanr(est, lam).statistic, rel=1e-12)
    assert s["pearson"]["value"] == pytest.approx(stats.pearsonr(est, lam).statistic, rel=1e-12)
    boot = stats.bootstrap((est, lam), lambda a, b: stats.spearmanr(a, b).statistic, paired=True, vectorized=False,
                           n_resamples=N_RESAMPLES, method="percentile", rng=np.random.default_rng(0))
    assert s["spearman"]["low"] == pytest.approx(boot.confidence_interval.low)
    assert s["spearman"]["high"] == pytest.approx(boot.confidence_interval.high)
    assert s["spearman"]["low"] <= s["spearman"]["value"] <= s["spearman"]["high"]
    c1x1 = np.array([r["correlation_unit"] + r["cross_unit"] for r in records])
    p1 = np.array([r["penalty_unit"] for r in records])
    gain = lambda v: v * c1x1 - v * v * p1  # noqa: E731
    assert s["median_efficiency"] == pytest.approx(np.median(gain(est) / gain(lam)))
    assert s["share_positive_efficiency"] == pytest.approx(np.mean(gain(est) / gain(lam) > 0))
    c_star = np.sum(est * lam) / np.sum(est * est)
    assert s["best_constant"] == pytest.approx(c_star)
    assert s["median_efficiency_scaled"] == pytest.approx(np.median(gain(c_star * est) / gain(lam)))
    # jvp_pooled was built as −estimate: every sign disagrees
    assert estimator_stats(records, "jvp_pooled")["sign_agreement"] == 0.0


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
        import json

        lines = [json.loads(line) for line in open(out / "decomposition.jsonl")]
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
    import json

    data = json.loads((tmp_path / "validation.json").read_text())
    assert set(data["estimators"]) == {"reference", "masked", "pooled", "jvp_masked", "jvp_pooled"}
    assert main(["plot", str(tmp_path / "runs"), "--out", str(tmp_path / "figs")]) == 0
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report.md"),
                 "--figures", str(tmp_path / "figs")]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## The paper's claims on this data" in report and "**holds**" in report
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
    import json

    for regime in ("detach", "occ"):
        out = write_run(tmp_path / "runs", regime, 0, n=2)
        rows = [json.loads(line) for line in open(out / "decomposition.jsonl")]
        (out / "decomposition.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["direction"] == "policy"))
        (out / "sweeps.jsonl").write_text("")
        (out / "curvature.jsonl").write_text("")
    runs = load_runs([tmp_path / "runs"])
    paths = make_figures(runs, tmp_path / "figs")
    assert len(paths) == len(FIGURES) and all(p.stat().st_size > 2000 for p in paths)
    text = build_report(runs, tmp_path / "r.md", tmp_path / "figs")
    assert "inconclusive" in text
