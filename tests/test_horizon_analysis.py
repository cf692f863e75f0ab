"""The analysis of ``horizon.jsonl`` (decomp/results/horizon.py): synthetic run directories with
known k-step records, each statistic against its hand-computed value."""

from __future__ import annotations

import json
import math
import warnings

import pytest
from synthetic_runs import edit_records, write_run

from decomp.results.horizon import gain_on_grid, horizon_note, horizon_stats
from decomp.results.rundata import load_runs
from decomp.results.validate import format_table, validate
from decomp.runlog import dumps
from decomp.search import NO_EFFECT, RISING
from decomp.training.cli import main

NAN = float("nan")
RESAMPLES = 200


def _record(step: int, lam_k: float, *, reason: str = "", gain_hat: float = 1.0, gain_hat_one: float = NAN,
            gain_coef: float = NAN, star: float = NAN, gain_star: float = NAN, interval=(None, None),
            unit_k: float = NAN, first: float = NAN, split: str = "heldout", direction: str = "active",
            coefs=None, gains=None) -> dict:
    rec = {"step": step, "update": 1, "completed_step": step + 1, "regime": "policy", "direction": direction,
           "regime_of_direction": "policy", "coef": 1.0, "split": split, "same_as": "", "horizon": 4,
           "lambda_hat_k": lam_k, "lambda_hat_k_reason": reason, "gain_hat_k": gain_hat,
           "lambda_hat_k_interval": list(interval), "lambda_hat_k_positive_prob": 0.5,
           "lambda_hat_k_near_optimal": [], "evaluations_k": 20, "coefs_k": coefs or [0.0, 1.0],
           "gains_k": gains or [0.0, 0.1], "gain_k_coef": gain_coef, "gain_k_lambda_star_k": gain_star,
           "gain_k_lambda_hat": gain_hat_one, "correlation_unit_k": 1.0, "penalty_unit_k": 1.0,
           "lambda_star_k": star, "lambda_star_k_reason": "", "correlation_unit_k_se": 0.1,
           "penalty_unit_k_se": 0.1, "lambda_star_k_se": 0.1, "unit_displacement_k_norm": unit_k,
           "unit_displacement_first_norm": first, "seconds": 1.5}
    return rec


def _with_copies(records: list[dict]) -> list[dict]:
    """Each active record, then its copy for the ``policy`` direction (a policy run: the shadow
    ``policy`` direction is the active one) and a distinct ``ce`` record that must not count."""
    out = []
    for r in records:
        out += [r, {**r, "direction": "policy", "same_as": "active", "seconds": 0.0},
                {**r, "direction": "ce", "regime_of_direction": "ce", "lambda_hat_k": -999.0, "gain_hat_k": 7.0,
                 "lambda_star_k": 999.0, "lambda_hat_k_interval": [-1e9, 1e9]}]
    return out


def _write_horizon(run_dir, records: list[dict], extra_lines: tuple[str, ...] = ()) -> None:
    with open(run_dir / "horizon.jsonl", "w") as f:
        f.writelines(dumps(r) + "\n" for r in records)
        f.writelines(line + "\n" for line in extra_lines)


def _set_one_step(run_dir, hats: dict[int, float], split: str = "heldout") -> None:
    """The decomposition records' one-step ``λ̂`` of ``split`` set per step (every direction)."""
    def edit(r):
        if r.get("split") == split and r["step"] in hats:
            r |= {"lambda_hat": hats[r["step"]], "lambda_hat_reason": ""}
        return r
    edit_records(run_dir, edit)


def _two_runs(root):
    """Runs A and B of the hand computation (module docstring of the test below)."""
    a = write_run(root, "policy", 0, n=3, heldout=True)
    _set_one_step(a, {1: 2.0, 2: 4.0, 3: -1.0})
    _write_horizon(a, _with_copies([
        _record(1, 20.0, gain_hat=1.0, gain_hat_one=0.5, star=10.0, gain_star=0.9, gain_coef=0.1,
                interval=(1.0, 30.0), unit_k=2.0, first=1.0),
        _record(2, 2.0, gain_hat=2.0, gain_hat_one=-1.0, star=-1.0, gain_star=-0.2, gain_coef=0.2,
                interval=(-1.0, 5.0), unit_k=3.0, first=1.0),
        _record(3, 3.0, gain_hat=0.0, gain_hat_one=5.0, star=2.0, gain_star=1.0, gain_coef=0.3,
                unit_k=4.0, first=1.0),
    ]))
    b = write_run(root, "policy", 1, n=3, heldout=True)
    _set_one_step(b, {1: 1.0, 2: 1.0, 3: 1.0})
    _write_horizon(b, _with_copies([
        _record(1, 10.0, gain_hat=2.0, gain_hat_one=2.0, star=5.0, gain_star=1.0, gain_coef=0.2,
                interval=(2.0, 20.0), unit_k=5.0, first=1.0),
        _record(2, 100.0, gain_hat=2.0, gain_hat_one=1.0, star=50.0, gain_star=1.5, gain_coef=0.4,
                interval=(50.0, 200.0), unit_k=5.0, first=1.0),
        _record(3, -5.0, reason=RISING.format(bound=5), gain_hat=2.0, gain_hat_one=NAN, star=NAN, gain_star=1.0,
                gain_coef=0.6, interval=(-10.0, -1.0), unit_k=5.0, first=0.0),
    ]))
    return load_runs([root])


@pytest.mark.parametrize("direction", ["policy", "active"])
def test_statistics_equal_the_hand_computed_values(tmp_path, direction):
    """Run A: one-step λ̂ = (2, 4, −1), λ̂_k = (20, 2, 3) → signs agree 2/3; log10 ratios (both
    interior, same sign) 1 and log10(½) → median |·| 0.6505, signed 0.3495. Run B: λ̂ = 1,
    λ̂_k = (10, 100, −5 at the bound) → 2/3 (the bound's sign counts), logs 1, 2 → 1.5, 1.5.
    Gains over gain_hat_k (> 0 only): one-step λ̂ A (0.5, −0.5) → median 0, > 0 ½; B (1, 0.5) →
    0.75, 1. λ*_k: A same sign 2/3, B 1; efficiency A (0.9, −0.1) → 0.4, B (0.5, 0.75, 0.5) →
    0.5. Applied coef: A 0.1, B 0.2. Interval excludes 0: A ½ (one has none), B 1. Tail ratio:
    A 3, B 5 (‖δ₁‖ = 0 left out). Combined: the mean over the two clusters."""
    runs = _two_runs(tmp_path)
    h = horizon_stats(runs, direction, n_resamples=RESAMPLES)
    s = h["statistics"]
    expected = {
        "sign_agreement": (2 / 3 + 2 / 3) / 2,
        "median_abs_log10_ratio": ((1 + math.log10(2)) / 2 + 1.5) / 2,
        "median_log10_ratio": ((1 - math.log10(2)) / 2 + 1.5) / 2,
        "one_step_efficiency": (0.0 + 0.75) / 2,
        "one_step_positive": (0.5 + 1.0) / 2,
        "star_sign_agreement": (2 / 3 + 1.0) / 2,
        "star_efficiency": (0.4 + 0.5) / 2,
        "coef_efficiency": (0.1 + 0.2) / 2,
        "interval_excludes_zero": (0.5 + 1.0) / 2,
        "tail_ratio": (3.0 + 5.0) / 2,
    }
    for key, value in expected.items():
        assert s[key]["value"] == pytest.approx(value, rel=1e-12), key
        assert s[key]["n_clusters"] == 2 and s[key]["n_runs"] == 2, key
        assert s[key]["low"] <= s[key]["value"] <= s[key]["high"], key
    per_run = h["per_run"]
    assert [p["n_sign"] for p in per_run] == [3, 3] and [p["n_log"] for p in per_run] == [2, 2]
    assert s["sign_agreement"]["n_records"] == 6 and s["median_abs_log10_ratio"]["n_records"] == 4
    assert s["one_step_efficiency"]["n_records"] == 4 and s["tail_ratio"]["n_records"] == 5
    assert s["interval_excludes_zero"]["n_records"] == 5
    # no heldout2 records: the out-of-sample λ*_k is not available, and says why
    assert s["star_other_sign_agreement"]["not_available"] == "no records"
    assert math.isnan(s["star_other_sign_agreement"]["value"])
    assert h["n_runs"] == 2 and h["n_clusters"] == 2 and h["n_records"] == 6 and h["horizon"] == [4]
    assert h["splits"] == {"heldout": 2, "train": 0}
    # copies count once: 3 active + 3 ce measurements per run, the policy copies left out
    assert h["n_measurements"] == 12
    assert "in-sample" in h["in_sample"]


def test_the_accuracy_after_k_updates_is_averaged_within_runs_then_over_clusters(tmp_path):
    """Run A: accuracy changes at λ̂_k (0.1, −0.2, missing) → −0.05; run B (0.3 at the bound, 0.1,
    0.2) → 0.2; combined (−0.05 + 0.2)/2; a coefficient no record carries: not available."""
    def with_acc(records, changes):
        return [r if c is None else {**r, "accuracy_k_lambda_hat_k_change": c, "accuracy_k_coef_change": 2 * c}
                for r, c in zip(records, changes, strict=True)]
    a = write_run(tmp_path, "policy", 0, n=3, heldout=True)
    _write_horizon(a, with_acc([_record(i, 1.0) for i in (1, 2, 3)], [0.1, -0.2, None]))
    b = write_run(tmp_path, "policy", 1, n=3, heldout=True)
    _write_horizon(b, with_acc([_record(1, 1e6, reason=RISING.format(bound=1e6))] + [_record(i, 1.0) for i in (2, 3)],
                               [0.3, 0.1, 0.2]))
    s = horizon_stats(load_runs([tmp_path]), "active", n_resamples=RESAMPLES)["statistics"]
    # policy runs that measured only their active direction: those records are the policy direction's
    as_policy = horizon_stats(load_runs([tmp_path]), "policy", n_resamples=RESAMPLES)["statistics"]
    assert as_policy["accuracy_change_lambda_hat_k"]["value"] == s["accuracy_change_lambda_hat_k"]["value"]
    assert s["accuracy_change_lambda_hat_k"]["value"] == pytest.approx((-0.05 + 0.2) / 2, rel=1e-12)
    assert s["accuracy_change_coef"]["value"] == pytest.approx(-0.05 + 0.2, rel=1e-12)
    assert s["accuracy_change_lambda_hat_k"]["n_records"] == 5
    assert s["accuracy_change_lambda_hat"]["not_available"] == "no records"
    # at the bound λ̂_k is only a sign: B's first record leaves the interior mean, (−0.05 + 0.15)/2
    assert s["accuracy_change_lambda_hat_k_interior"]["value"] == pytest.approx((-0.05 + 0.15) / 2, rel=1e-12)


def test_copies_count_once(tmp_path):
    runs = _two_runs(tmp_path)
    run = runs[0]
    assert len(run.horizons) == 9
    assert len(run.unique_horizon_records()) == 6
    assert {r["direction"] for r in run.unique_horizon_records()} == {"active", "ce"}
    assert len(run.horizon_records("policy", "heldout")) == 3  # a copy stands for its direction


def test_fewer_than_two_clusters_is_not_available(tmp_path):
    runs = _two_runs(tmp_path)[:1]
    h = horizon_stats(runs, "policy", n_resamples=RESAMPLES)
    for key, d in h["statistics"].items():
        assert math.isnan(d["value"]) and d["not_available"], key
    assert h["statistics"]["sign_agreement"]["not_available"].startswith("1 cluster")
    assert h["per_run"][0]["sign_agreement"] == pytest.approx(2 / 3)  # the run's own value stays
    note = horizon_note(h)
    assert "n/a (1 cluster" in note


def test_lambda_star_k_judged_on_the_second_heldout_batch(tmp_path):
    """Run 1: the heldout λ*_k = 3 is on the heldout2 grid (ΔJ_k = 0.6, gain_hat_k 1.2 → ½), −2 is
    not (no efficiency, never interpolated); same sign as the heldout2 λ̂_k (5, 4): ½. Run 2: λ*_k =
    1 on the grid (0.5/1 → ½ twice), same sign 1. Combined: ¾ and ½."""
    grid, gains = [-1.0, 0.0, 3.0, 10.0], [-0.1, 0.0, 0.6, 1.2]
    r1 = write_run(tmp_path, "policy", 0, n=2, heldout=True, heldout2=True)
    _write_horizon(r1, [
        _record(1, 4.0, star=3.0), _record(1, 5.0, split="heldout2", gain_hat=1.2, coefs=grid, gains=gains),
        _record(2, 4.0, star=-2.0), _record(2, 4.0, split="heldout2", gain_hat=1.2, coefs=grid, gains=gains),
    ])
    r2 = write_run(tmp_path, "policy", 1, n=2, heldout=True, heldout2=True)
    _write_horizon(r2, [
        r for i in (1, 2) for r in (
            _record(i, 2.0, star=1.0),
            _record(i, 2.0, split="heldout2", gain_hat=1.0, coefs=[0.0, 1.0, 2.0], gains=[0.0, 0.5, 1.0]))
    ])
    h = horizon_stats(load_runs([tmp_path]), "active", n_resamples=RESAMPLES)
    s = h["statistics"]
    assert s["star_other_sign_agreement"]["value"] == pytest.approx(0.75)
    assert s["star_other_efficiency"]["value"] == pytest.approx(0.5)
    assert s["star_other_efficiency"]["n_records"] == 3  # λ*_k = −2 is not on the grid
    assert h["heldout2_runs"] == 2 and h["splits"]["heldout"] == 2
    assert math.isnan(gain_on_grid({"coefs_k": grid, "gains_k": gains}, 2.9))


def test_train_split_without_heldout(tmp_path):
    run = write_run(tmp_path, "policy", 0, n=2)
    _set_one_step(run, {1: 1.0, 2: 1.0}, split="train")
    _write_horizon(run, [_record(1, 2.0, split="train"), _record(2, -2.0, split="train"),
                         _record(2, NAN, reason=NO_EFFECT, split="train", direction="ce")])
    h = horizon_stats(load_runs([tmp_path]), "active", n_resamples=RESAMPLES)
    assert h["splits"] == {"heldout": 0, "train": 1}
    assert h["per_run"][0]["sign_agreement"] == pytest.approx(0.5)
    assert h["per_run"][0]["median_log10_ratio"] == pytest.approx(math.log10(2))
    ce = horizon_stats(load_runs([tmp_path]), "ce", n_resamples=RESAMPLES)
    assert ce["per_run"][0]["n_sign"] == 0  # the direction does not move J: no λ̂_k
    assert ce["statistics"]["sign_agreement"]["not_available"] == "no records"


def test_malformed_horizon_lines_are_skipped_with_a_warning(tmp_path):
    run = write_run(tmp_path, "policy", 0, n=2, heldout=True)
    good = [_record(1, 2.0), _record(2, 3.0)]
    bad = (
        '{"step": 3, "direction": "active", "horizon": 4, "lambda_ha',  # truncated
        json.dumps({"step": "x", "direction": "active", "horizon": 4, "lambda_hat_k": 1.0}),
        json.dumps({"step": 4, "direction": "active", "horizon": 4}),  # no lambda_hat_k
        json.dumps({**good[0], "step": 5, "coefs_k": [0.0, 1.0], "gains_k": [0.0]}),
        json.dumps({**good[0], "step": 6, "gain_hat_k": "big"}),
        json.dumps({**good[0], "step": 7, "lambda_hat_k_interval": [1.0]}),
        "[1, 2]",
    )
    _write_horizon(run, good, bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = load_runs([tmp_path])
    messages = [str(w.message) for w in caught if "horizon.jsonl" in str(w.message)]
    assert len(messages) == len(bad), messages
    assert all("skipping" in m for m in messages)
    assert any("coefs_k and gains_k differ" in m for m in messages)
    assert [r["step"] for r in runs[0].horizons] == [1, 2]


def test_validate_prints_the_horizon_note_only_with_records(tmp_path, capsys):
    plain = tmp_path / "plain"
    write_run(plain, "policy", 0, n=3, heldout=True)
    write_run(plain, "policy", 1, n=3, heldout=True)
    result = validate(load_runs([plain]), n_resamples=RESAMPLES)
    assert "horizon" not in result and "Horizon" not in format_table(result)

    _two_runs(tmp_path / "hz")
    result = validate(load_runs([tmp_path / "hz"]), n_resamples=RESAMPLES)
    assert result["horizon"]["n_records"] == 6
    text = format_table(result)
    assert "Horizon (k = 4;" in text and "in-sample" in text
    assert main(["validate", str(tmp_path / "hz"), "--out", str(tmp_path / "v.json")]) == 0
    assert "Horizon (k = 4;" in capsys.readouterr().out
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["horizon"]["statistics"]["sign_agreement"]["value"] == pytest.approx(2 / 3)
    # horizon records of other directions only: the note says so
    result = validate(load_runs([tmp_path / "hz"]), direction="distill-joint", n_resamples=RESAMPLES)
    assert "none of direction `distill-joint`" in format_table(result)
