"""The noise ceiling and the validation's statistics (docs/estimators.md §5.3): split-half
reliability from a second held-out batch, `no signal` where the target is noise, clusters of runs
that share one policy trajectory, λ* against a λ̂ of another batch, no efficiencies for the
proxies, a magnitude-free pilot rule, r_C over every run, and the terms' intervals where people look."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from synthetic_runs import edit_records, write_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: analysis/ is not installed

from decomp.reliability import disattenuated, sign_agreement_probability  # noqa: E402
from decomp.results.claims import policy_decay, proxy_tracks  # noqa: E402
from decomp.results.plots import plot_terms  # noqa: E402
from decomp.results.report import build_report  # noqa: E402
from decomp.results.rundata import cluster_of, load_runs  # noqa: E402
from decomp.results.stats import FAILS, HOLDS, NO_SIGNAL, N_RESAMPLES  # noqa: E402
from decomp.results.validate import format_table, validate  # noqa: E402

REGIMES = ("detach", "ce", "policy", "occ")


def _noise_target(run_dir: Path, seed: int) -> None:
    """Replace λ̂ on both held-out batches by independent noise: a target with no reliability."""
    rng = np.random.default_rng(seed)
    edit_records(run_dir, lambda r: r | {"lambda_hat": float(rng.standard_normal())}
                 if r.get("split") in ("heldout", "heldout2") else r)


def _anti_proxy_runs(root: Path, noise: bool) -> list:
    """The data on which the proxy claim does not hold (the proxy ranks λ̂ backwards), with a second
    held-out batch; with ``noise`` the held-out λ̂ is pure noise on both batches."""
    for k, regime in enumerate(REGIMES):
        out = write_run(root, regime, 20, estimate=lambda lam, i: -lam * 0.01 - 1e-4 * i,
                        c1=lambda i, d: 1e-3 * (1 + i / 10), heldout=True, heldout2=True)
        if noise:
            _noise_target(out, k)
    return load_runs([root])


def test_ceiling_is_the_split_half_agreement_of_the_two_heldout_batches(tmp_path):
    runs = _anti_proxy_runs(tmp_path, noise=False)
    result = validate(runs)
    ceiling = result["ceiling"]
    assert ceiling["measured"] and ceiling["n_runs"] == 4 and ceiling["n_pairs"] == 4 * 30
    per_rho, per_sign = [], []
    for run in runs:
        first = {r["step"]: r["lambda_hat"] for r in run.records("policy", "heldout")}
        pairs = np.array([(first[r["step"]], r["lambda_hat"]) for r in run.records("policy", "heldout2")])
        per_rho.append(sps.spearmanr(pairs[:, 0], pairs[:, 1]).statistic)
        per_sign.append(np.mean(np.sign(pairs[:, 0]) == np.sign(pairs[:, 1])))
    hat = ceiling["targets"]["lambda_hat"]
    assert hat["spearman"]["value"] == pytest.approx(np.mean(per_rho))
    assert hat["sign_agreement"]["value"] == pytest.approx(np.mean(per_sign))
    assert hat["signal"] == {"sign_agreement": True, "spearman": True}
    # beside the ceiling and corrected for attenuation (the estimator's reliability 1)
    ref = result["estimators"]["reference"]
    rho_est = np.mean([p["spearman"] for p in ref["per_run"]])
    att = ref["attenuation"]["spearman"]
    assert att["ceiling"]["value"] == pytest.approx(math.sqrt(np.mean(per_rho)))
    assert att["corrected"]["value"] == pytest.approx(disattenuated(rho_est, np.mean(per_rho)))
    assert att["corrected"]["low"] <= att["corrected"]["value"] <= att["corrected"]["high"]
    sign = ref["attenuation"]["sign_agreement"]
    assert sign["ceiling"]["value"] == pytest.approx((1 + math.sqrt(2 * np.mean(per_sign) - 1)) / 2)
    assert ref["verdict"]["spearman"] == FAILS  # a reliable target: the proxy ranks it backwards
    assert "Noise ceiling over 4 run(s)" in format_table(result) and "ρ: ceiling / corrected" in format_table(result)


def test_an_unreliable_target_gives_no_signal_instead_of_does_not_hold(tmp_path):
    control = _anti_proxy_runs(tmp_path / "reliable", noise=False)
    noisy = _anti_proxy_runs(tmp_path / "noise", noise=True)
    assert proxy_tracks(control).verdict == FAILS
    claim = proxy_tracks(noisy)
    assert claim.verdict == NO_SIGNAL and "split-half ρ" in claim.statistic
    result = validate(noisy)
    hat = result["ceiling"]["targets"]["lambda_hat"]
    t = hat["t_interval"]["spearman"]
    assert t["low"] <= 0 < t["high"] and not hat["signal"]["spearman"]
    # jvp_pooled ranks the noise backwards by chance (a bootstrap interval below 0): no signal, not "does not hold"
    assert result["estimators"]["jvp_pooled"]["spearman"]["high"] < 0
    assert result["estimators"]["jvp_pooled"]["verdict"]["spearman"] == NO_SIGNAL
    assert all(v in (HOLDS, NO_SIGNAL) for s in result["estimators"].values() for v in s["verdict"].values())
    assert "no signal: λ̂" in format_table(result)


def test_without_a_second_batch_no_ceiling_is_measured_and_the_errors_predict_one(tmp_path):
    for s in range(3):
        out = write_run(tmp_path, "policy", s, heldout=True)
        edit_records(out, lambda r: r | {"correlation_se": abs(r["correlation"]) / (1 + r["step"] % 3),
                                         "penalty_se": None})
    runs = load_runs([tmp_path])
    result = validate(runs)
    assert not result["ceiling"]["measured"]
    z = [[r["correlation"] / r["correlation_se"] for r in run.records("policy", "heldout")] for run in runs]
    expected = np.mean([np.mean(sign_agreement_probability(np.array(v))) for v in z])
    assert result["ceiling"]["predicted"]["correlation"]["value"] == pytest.approx(expected)
    assert math.isnan(result["ceiling"]["predicted"]["penalty"]["value"])
    text = format_table(result)
    assert "No noise ceiling measured" in text and f"predicted, not measured) of {expected:.2f} for C" in text
    # verdicts stay those of the statistics alone: no ceiling to turn them into `no signal`
    assert all(s["verdict"]["spearman"] != NO_SIGNAL for s in result["estimators"].values())


def test_runs_that_differ_only_in_what_they_measure_are_one_cluster():
    """A noise-ceiling or horizon run and a plain run of one regime and seed train one policy; a
    training setting, or the held-out size an oracle's rule reads, makes another trajectory; a
    setting at its default counts as absent (a run written before it existed)."""
    from pathlib import Path

    from decomp.results.rundata import Run

    base = {"regime": "policy", "task": "add", "seed": 0, "mtp_scale": 1.0, "lr": 1e-3}

    def key(**changes):
        return cluster_of(Run(Path("/runs/x"), {**base, **changes}))
    plain = key()
    assert key(noise_ceiling=True, horizon=4, heldout_groups=32, label="policy-ceiling", steps=50) == plain
    assert key(oracle_decades=9) == plain  # the default, as if absent
    assert key(mtp_scale=0.1) != plain and key(lr=1e-4) != plain and key(seed=1) != plain
    oracle = {"regime": "oracle"}
    assert key(**oracle, heldout_groups=32) != key(**oracle) and key(**oracle, noise_ceiling=True) == key(**oracle)


def test_runs_sharing_one_policy_trajectory_are_one_cluster(tmp_path):
    """detach, frozen and distill of one seed share the policy; so does a collapsed run of that
    seed. Seed 0's three runs agree in sign with λ̂, seeds 1 and 2 (detach only) never do: over
    runs the mean would be 3/5, over clusters it is 1/3."""
    for regime in ("detach", "frozen", "distill"):
        write_run(tmp_path, regime, 0, estimate=lambda lam, i: 0.01 * lam)
    for s in (1, 2):
        write_run(tmp_path, "detach", s, estimate=lambda lam, i: -0.01 * lam)
    write_run(tmp_path, "oracle", 1, n=10, warm=0.4, final=0.05, estimate=lambda lam, i: -0.01 * lam)  # collapsed
    write_run(tmp_path, "occ", 1, estimate=lambda lam, i: -0.01 * lam)  # its own trajectory
    runs = load_runs([tmp_path])
    clusters = {(r.regime, r.seed): cluster_of(r) for r in runs}
    assert clusters[("frozen", 0)] == clusters[("distill", 0)] == clusters[("detach", 0)]
    assert clusters[("oracle", 1)] == clusters[("detach", 1)] != clusters[("occ", 1)]
    result = validate(runs)
    agree = result["estimators"]["reference"]["sign_agreement"]
    assert result["n_runs"] == 7 and result["n_clusters"] == 4
    assert agree["n_runs"] == 7 and agree["n_clusters"] == 4
    assert agree["value"] == pytest.approx(np.mean([1.0, 0.0, 0.0, 0.0]))
    rng = np.random.default_rng(0)
    per_cluster = np.array([1.0, 0.0, 0.0, 0.0])
    reps = [per_cluster[rng.integers(0, 4, size=4)].mean() for _ in range(N_RESAMPLES)]
    assert (agree["low"], agree["high"]) == pytest.approx(tuple(np.percentile(reps, [2.5, 97.5])))


def test_lambda_star_is_never_judged_against_the_lambda_hat_of_its_own_batch(tmp_path):
    """Each held-out record's own λ* is set to the opposite sign of λ̂: judging it against its own
    batch's λ̂ would give same sign 0; the train batch's λ* (coef_exact) has λ̂'s sign."""
    for s in range(3):
        out = write_run(tmp_path / "one", "policy", s, heldout=True, exact=True)
        edit_records(out, lambda r: r | {"lambda_star": -r["lambda_star"], "gain_lambda_star": -1.0}
                     if r["split"] == "heldout" else r)
    ls = validate(load_runs([tmp_path / "one"]))["lambda_star"]
    assert ls["against"] == {"heldout2": 0, "heldout": 3} and ls["same_sign"]["value"] == 1.0
    runs = load_runs([tmp_path / "one"])
    eff = [np.median([r["gain_exact"] / r["gain_hat"] for r in run.records("policy", "heldout")]) for run in runs]
    assert ls["median_efficiency"]["value"] == pytest.approx(np.mean(eff))
    # with a second held-out batch: gain_exact / gain_lambda_hat_other on it (can exceed 1)
    for s in range(3):
        out = write_run(tmp_path / "two", "policy", s, heldout=True, heldout2=True, exact=True)
        edit_records(out, lambda r: r | {"gain_lambda_hat_other": 0.5 * r["gain_exact"]}
                     if r["split"] == "heldout2" else r)
    result = validate(load_runs([tmp_path / "two"]))
    assert result["lambda_star"]["against"] == {"heldout2": 3, "heldout": 0}
    assert result["lambda_star"]["median_efficiency"]["value"] == pytest.approx(2.0)
    assert "judged on the second held-out batch" in format_table(result)
    # training records only: no λ̂ of another batch, no comparison
    write_run(tmp_path / "train", "policy", 0, exact=True)
    assert validate(load_runs([tmp_path / "train"]))["lambda_star"]["n_runs"] == 0


def test_proxy_efficiencies_are_not_reported(tmp_path):
    for s in range(3):
        write_run(tmp_path, "policy", s, exact=True)
    result = validate(load_runs([tmp_path]))
    text = format_table(result)
    for name in ("reference", "masked", "pooled"):
        assert not result["estimators"][name]["lambda_units"]
        assert math.isnan(result["estimators"][name]["median_efficiency"]["value"])
        row = next(line for line in text.splitlines() if line.startswith(name))
        assert row.count("n/a (not in λ units)") == 2
    assert result["estimators"]["exact"]["median_efficiency"]["value"] == pytest.approx(1.0, abs=0.05)


def test_the_pilot_rule_does_not_reward_magnitude(tmp_path):
    """The reference proxy ranks λ̂ perfectly at 1% of its size (realized efficiency ≈ 0.02);
    jvp_masked is noise at λ̂'s size whose records claim an efficiency of 0.9: the old rule
    (highest median efficiency) chose jvp_masked, the scale-free rule chooses a proxy."""
    from analysis.pilot import best_estimator

    runs = []
    for s in (0, 1):
        out = write_run(tmp_path, "policy-c1", s, heldout=True, c1=lambda i, d: 1e-3 * (1 + i / 10),
                        estimate=lambda lam, i: 0.01 * lam)
        rng = np.random.default_rng(s)
        edit_records(out, lambda r: r | {"coef_jvp_masked": float(rng.standard_normal()) * r["lambda_hat"],
                                         "efficiency_jvp_masked": 0.9})
        runs += load_runs([out])
    best, result = best_estimator({"add": runs})
    assert result["estimators"]["jvp_masked"]["median_efficiency"]["value"] == pytest.approx(0.9)
    assert best in ("reference", "masked", "pooled")


def test_the_decay_ratio_counts_runs_that_start_negative(tmp_path):
    for k in range(3):
        write_run(tmp_path, "policy", k, c1=lambda i, d: 1e-3 * (1 - 0.9 * i / 30))
    write_run(tmp_path, "policy", 3, c1=lambda i, d: -1e-3)  # starts with C < 0
    runs = load_runs([tmp_path])
    claim = policy_decay(runs)
    ratios = []
    for run in runs:
        c = {r["step"]: r["correlation"] for r in run.records("active")}
        early, late = np.mean([c[s] for s in range(1, 11)]), np.mean([c[s] for s in range(21, 31)])
        ratios.append(late / abs(early))
    assert ratios[-1] == pytest.approx(-1.0)
    assert claim.value == pytest.approx(np.mean(ratios)) and "4 runs with C_early ≠ 0, 3 of them > 0" in claim.statistic


def _with_errors(run_dir: Path) -> None:
    """C's sampling error |C|/3 (z = 3) on steps ≤ 15, |C| (z = 1) after; P's |P|/10."""
    edit_records(run_dir, lambda r: r | {"correlation_se": abs(r["correlation"]) / (3 if r["step"] <= 15 else 1),
                                         "penalty_se": abs(r["penalty"]) / 10})


def test_terms_figure_draws_each_term_with_its_interval(tmp_path):
    _with_errors(write_run(tmp_path / "one", "policy", 0))
    fig = plot_terms(load_runs([tmp_path / "one"]), "policy")
    ax = fig.axes[0]  # correlation
    recs = load_runs([tmp_path / "one"])[0].records("policy")
    top = max(r["correlation"] + 1.959964 * r["correlation_se"] for r in recs)
    bands = [p.vertices[:, 1].max() for coll in ax.collections for p in coll.get_paths()]
    assert bands and max(bands) == pytest.approx(top, rel=1e-4)
    assert "sampling error" in fig._suptitle.get_text()
    # two runs of a regime: the t-interval over runs
    for s, scale in ((0, 1.0), (1, 3.0)):
        write_run(tmp_path / "two", "policy", s, c1=lambda i, d, k=scale: k * 1e-3)
    fig = plot_terms(load_runs([tmp_path / "two"]), "policy")
    c = np.array([0.1e-3, 0.3e-3])  # coef 0.1 × C₁
    half = sps.t.ppf(0.975, 1) * c.std(ddof=1) / math.sqrt(2)
    bands = [p.vertices[:, 1].max() for coll in fig.axes[0].collections for p in coll.get_paths()]
    assert max(bands) == pytest.approx(c.mean() + half, rel=1e-6)
    assert "over runs" in fig._suptitle.get_text()


def test_reports_state_the_share_of_terms_distinguishable_from_zero(tmp_path):
    from analysis.report import terms_section

    for s in range(3):
        _with_errors(write_run(tmp_path / "se", "policy", s, heldout=True))
        write_run(tmp_path / "se", "occ", s, heldout=True)  # no sampling errors
    runs = load_runs([tmp_path / "se"])
    text = build_report(runs, tmp_path / "r.md")
    assert "| policy | 0.50 (3 runs, 90 records) | 1.00 (3 runs, 90 records) |" in text
    assert "| occ | n/a (no sampling errors) | n/a (no sampling errors) |" in text
    study = "\n".join(terms_section("add", runs))
    assert "| policy | 0.50 (3 runs, 90 records) | 1.00 (3 runs, 90 records) |" in study
    assert "| occ | n/a (no sampling errors) |" in study
