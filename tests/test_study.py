"""The study's code (top-level ``analysis/``) on small synthetic run directories."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from synthetic_runs import edit_records, write_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: analysis/ is not installed

from analysis import design, study  # noqa: E402
from analysis.pilot import chosen_scale, effect_ratio  # noqa: E402
from analysis.summaries import acceptance_rate, non_inferiority, superiority  # noqa: E402
from decomp.results.rundata import load_runs  # noqa: E402
from decomp.results.stats import FAILS, HOLDS, INCONCLUSIVE  # noqa: E402


def test_jobs_cover_the_design_seed_by_seed_and_split_by_seed(tmp_path):
    every = study.jobs(design.STUDY, tmp_path)
    assert len(every) == len(design.TASKS) * len(design.SEEDS) * len(design.ARMS)
    assert [j.seed for j in every] == sorted(j.seed for j in every)
    part = study.jobs(design.STUDY, tmp_path, seeds=[3], tasks=["chain"])
    assert {(j.task, j.seed) for j in part} == {("chain", 3)} and len(part) == len(design.ARMS)
    assert len({j.out for j in every}) == len(every)  # one folder per run
    labels = {j.settings["label"] for j in every}
    assert {"occ", f"occ-{design.BEST_ESTIMATOR}", "oracle", "cosine", "frozen", "distill"} <= labels
    occ = next(j for j in every if j.settings["label"] == "occ")
    assert occ.settings["occ_estimator"] == "reference" and occ.settings["mtp_scale"] == design.SCALE


@pytest.mark.parametrize("name", sorted(study.DESIGNS))
def test_every_arm_of_every_design_is_a_valid_run_configuration(tmp_path, name):
    """A typo in an arm's settings fails here, not hours into a study."""
    from decomp.training.config import TrainConfig

    for job in study.jobs(study.DESIGNS[name], tmp_path, seeds=[0]):
        TrainConfig(**{k: v for k, v in job.settings.items()}).validate()


def test_a_killed_study_resumes_and_a_finished_run_is_kept(tmp_path):
    job = study.jobs(design.STUDY, tmp_path, seeds=[0], tasks=["add"])[0]
    assert "--resume" not in job.command() and not job.done()
    job.out.mkdir(parents=True)
    (job.out / "config.json").write_text("{}")
    assert "--resume" in job.command()  # killed mid-run: continue from its checkpoint
    (job.out / "summary.json").write_text("{}")
    assert job.done()
    cmd = job.command()
    assert cmd[cmd.index("--threads") + 1] == "1"
    assert f"label={job.settings['label']}" in cmd and "search=True" in cmd


def _runs(root: Path, finals: dict[str, list[float]], heldout: bool = True):
    for arm, values in finals.items():
        for seed, final in enumerate(values):
            write_run(root, arm, seed, n=20, warm=0.4, final=final, heldout=heldout)
    return load_runs([root])


def test_non_inferiority_and_superiority_follow_their_intervals(tmp_path):
    # occ within 0.5 points of detach on every seed: holds; oracle clearly above: beats detach
    runs = _runs(tmp_path / "a", {"detach": [0.60, 0.62, 0.58, 0.61], "occ": [0.602, 0.618, 0.585, 0.607],
                                  "oracle": [0.65, 0.67, 0.64, 0.66], "ce": [0.50, 0.52, 0.49, 0.51]})
    assert non_inferiority(runs, "occ", "detach", k=1).verdict == HOLDS
    assert superiority(runs, "oracle", "detach", k=1).verdict == HOLDS
    assert non_inferiority(runs, "ce", "detach", k=1).verdict == FAILS
    assert superiority(runs, "ce", "detach", k=1).verdict == FAILS
    # a noisy difference straddling the margin is inconclusive; one seed always is
    noisy = _runs(tmp_path / "b", {"detach": [0.60, 0.60, 0.60], "occ": [0.66, 0.55, 0.58]})
    assert non_inferiority(noisy, "occ", "detach", k=1).verdict == INCONCLUSIVE
    one = _runs(tmp_path / "c", {"detach": [0.6], "occ": [0.9]})
    assert non_inferiority(one, "occ", "detach", k=1).verdict == INCONCLUSIVE


def test_final_accuracy_is_the_mean_of_the_last_evaluations(tmp_path):
    runs = _runs(tmp_path, {"detach": [0.6]})
    evals = runs[0].evaluations  # 0.4 → 0.6 linearly, every 10 of 20 steps
    assert runs[0].final_accuracy_mean(2) == pytest.approx(sum(evals[-2:]) / 2)


def test_acceptance_rate_reads_the_last_steps(tmp_path):
    out = write_run(tmp_path, "distill", 0, n=60)
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows[1:]:
        r["mtp_acceptance_rate"] = 0.2 if r["step"] <= 10 else 0.5
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert acceptance_rate(load_runs([out])[0]) == pytest.approx(0.5)


def test_pilot_scale_rule_picks_the_smallest_scale_that_matters(tmp_path):
    tasks = {"add": []}
    for c, ratio in ((0.1, 0.01), (1.0, 0.3), (10.0, 2.0)):
        for seed in (0, 1):
            out = write_run(tmp_path, f"policy-c{c:g}", seed, n=6, heldout=True)
            edit_records(out, lambda r, q=ratio: {**r, "realized_rl": r["realized"] / q if r["realized"] else 1.0})
            run = load_runs([out])[0]
            assert effect_ratio(run) == pytest.approx(ratio)
            tasks["add"].append(run)
    c, means = chosen_scale(tasks)
    assert c == 1.0 and means[0.1] == pytest.approx(0.01)


@pytest.mark.slow
def test_report_writes_the_study_and_its_figures(tmp_path):
    from analysis.report import build

    for task in ("add", "chain"):
        _runs(tmp_path / "study" / task, {"detach": [0.6, 0.62, 0.58], "occ": [0.61, 0.6, 0.59],
                                          "oracle": [0.7, 0.66, 0.68]})
    text = build(tmp_path / "study", None, tmp_path / "figures")
    for heading in ("## Design", "### add: final accuracy", "### chain: does calibrating λ help?",
                    "the estimators against the realized optimum", "the paper's claims"):
        assert heading in text
    assert "oracle beats detach" in text and "**holds**" in text
    for name in ("accuracy", "training", "terms", "estimators", "tradeoff", "lambda"):
        assert (tmp_path / "figures" / f"study_{name}.png").stat().st_size > 10_000


def _finished_runs(root: Path, finals: dict[str, list[float]]) -> dict[tuple[str, int], Path]:
    """Finished synthetic runs (``summary.json`` written), one per arm and seed, by (arm, seed)."""
    out = {}
    for arm, values in finals.items():
        for seed, final in enumerate(values):
            out[arm, seed] = write_run(root, arm, seed, n=20, warm=0.4, final=final, heldout=True)
            (out[arm, seed] / "summary.json").write_text("{}")
    return out


def test_the_oracles_page_states_each_oracle_against_detach(tmp_path):
    from analysis.oracles import page

    root = tmp_path / "oracles" / "add"
    _finished_runs(root, {"detach": [0.60, 0.62, 0.58], "oracle-b10": [0.10, 0.12, 0.08],
                          "oracle-b10-interval": [0.61, 0.64, 0.60]})
    write_run(root, "oracle-b10-shrink", 0, n=20, warm=0.4, final=0.9, heldout=True)  # unfinished: left out
    text = page(tmp_path / "oracles")
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if " beats detach |" in line}
    assert rows["oracle-b10 beats detach"].endswith("**does not hold** |")
    assert rows["oracle-b10-interval beats detach"].endswith("**holds** |")
    assert "oracle-b10-shrink beats detach" not in rows


def test_the_controls_page_states_each_occ_arm_and_the_size_of_its_coefficient(tmp_path):
    """Three seeds per arm: occ-split within 0.5 points of detach (non-inferior: holds), occ-random-sign 20
    points below (does not hold); the magnitudes are the runs' own: abs(mtp_coef) per step, occ_estimate_abs,
    and the fallback share (one of the two updates of every step falls back: 50%)."""
    import json

    from analysis.controls import page

    root = tmp_path / "controls" / "add"
    runs = _finished_runs(root, {"detach": [0.60, 0.62, 0.58], "occ-split": [0.601, 0.62, 0.581],
                                 "occ-random-sign": [0.40, 0.42, 0.38]})
    for (arm, seed), out in runs.items():
        if arm == "detach":
            continue
        path = out / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for r in rows[1:]:
            r |= {"mtp_coef": -0.002 * (seed + 1), "occ_estimate_abs": 0.004, "fallback_updates": 1}
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = json.loads((out / "config.json").read_text())
        cfg["config"] |= {"num_minibatches": 2, "epochs": 1}
        (out / "config.json").write_text(json.dumps(cfg))
    text = page(tmp_path / "controls", "controls_tradeoff.png")
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if " detach |" in line}
    assert rows["occ-split matches or beats detach"].endswith("**holds** |")
    assert rows["occ-random-sign matches or beats detach"].endswith("**does not hold** |")
    sizes = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines()
             if line.startswith("| occ-split | 3 |")}
    cells = sizes["occ-split"]
    assert cells[2].startswith("0.004 [") and cells[3] == "0.004 [0.004, 0.004]" and cells[4].startswith("50 [")
    assert "![final accuracy against draft acceptance per arm](controls_tradeoff.png)" in text
