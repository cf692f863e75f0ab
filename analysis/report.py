"""``figures/STUDY.md`` and ``figures/study_*.png`` from the study's run directories.

    python -m analysis.report [--study runs/study] [--pilot runs/pilot] [--out figures]

Reads any set of run directories laid out as ``ROOT/<task>/<arm>-seed<seed>`` (several machines'
parts of the study copied under one root work as well). Every verdict is computed from the runs
by a stated rule with its interval (docs/estimators.md §5); nothing is written by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from analysis import design
from analysis.figures import make_figures
from analysis.study import machine
from analysis.summaries import (
    accuracy_rows,
    non_inferiority,
    superiority,
    term_rows,
)
from decomp.results.claims import evaluate_claims
from decomp.results.report import distinguishable_cell, distinguishable_rows
from decomp.results.rundata import Run, load_runs, regimes_of
from decomp.vocabulary import TERMS
from decomp.results.stats import Z_DISTINGUISHABLE, fmt, fmt_interval
from decomp.results.validate import format_table, validate


def load_tasks(root: Path) -> dict[str, list[Run]]:
    """``{task: runs}`` for every task folder under ``root`` (warnings about damaged input kept)."""
    tasks = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "logs"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                runs = load_runs([folder])
            except ValueError:
                continue
        order = {a.label: i for i, a in enumerate(design.ARMS)}
        tasks[folder.name] = sorted(runs, key=lambda r: (order.get(r.regime, len(order)), r.regime, r.seed))
    return tasks


def run_root_args(argv: list[str] | None, design_name: str, doc: str, out_help: str) -> tuple[Path, Path] | None:
    """``(run root, output folder)`` of a page's command line (``--runs``, default
    ``runs/<design_name>``; ``--out``, default ``figures``), or ``None`` after saying which command
    makes the missing run root."""
    ap = argparse.ArgumentParser(prog=f"python -m analysis.{design_name}", description=doc.splitlines()[0])
    ap.add_argument("--runs", default=f"runs/{design_name}", help=f"the {design_name} design's run root")
    ap.add_argument("--out", default="figures", help=out_help)
    args = ap.parse_args(argv)
    root = Path(args.runs)
    if not root.is_dir():
        print(f"no run root {root}: run `python -m analysis.study {design_name} --out {root}` first", file=sys.stderr)
        return None
    return root, Path(args.out)


def finished_tasks(root: Path) -> dict[str, list[Run]]:
    """:func:`load_tasks` keeping the finished runs only (``summary.json`` present): a run still
    going, or killed, is left out of a page."""
    return {task: [r for r in runs if (r.path / "summary.json").is_file()] for task, runs in load_tasks(root).items()}


def _ci(d: dict[str, Any], scale: float = 100.0, spec: str = ".1f") -> str:
    if d["n"] == 0:
        return "—"
    value = fmt(scale * d["value"], spec)
    if d["n"] < 2:
        return f"{value} (1 seed)"
    return f"{value} [{fmt(scale * d['low'], spec)}, {fmt(scale * d['high'], spec)}]"


def accuracy_section(task: str, runs: list[Run], k: int) -> list[str]:
    lines = [f"### {task}: final accuracy", "",
             f"Held-out greedy accuracy on the task's {2000} fixed held-out problems; a run's final accuracy is the "
             f"mean of its last {k} evaluations (every 10 steps). Mean over seeds with its 95% t-interval; the "
             "difference to detach is paired by seed (same warm start). The acceptance rate is the MTP head's "
             "expected acceptance as a speculative-sampling draft, Σ_v min(p(v), q(v)), over the last 50 steps.", "",
             "| arm | seeds | warm start (%) | final (%) | − detach (points) | acceptance rate |",
             "|---|---|---|---|---|---|"]
    for row in accuracy_rows(runs, k):
        diff = "—" if row["vs_baseline"] is None else _ci(row["vs_baseline"], spec="+.1f")
        lines.append(f"| {row['arm']} | {len(row['seeds'])} | {_ci(row['warm'])} | {_ci(row['final'])} | {diff} | "
                     f"{_ci(row['acceptance'], 1.0, '.3f')} |")
    return lines + [""]


def verdict_section(task: str, runs: list[Run], k: int) -> list[str]:
    arms = regimes_of(runs)
    comparisons = [non_inferiority(runs, a, "detach", k) for a in arms if a.startswith("occ")]
    comparisons += [superiority(runs, a, "detach", k) for a in arms if a.startswith("oracle")]
    comparisons += [superiority(runs, a, "detach", k) for a in arms if a in ("cosine", "ce", "policy")]
    lines = [f"### {task}: does calibrating λ help?", "", "| question | mean difference [95% CI] (points) | seeds | rule | verdict |",
             "|---|---|---|---|---|"]
    for c in comparisons:
        question = (f"{c.arm} matches or beats {c.baseline}" if "holds if low ≥" in c.rule
                    else f"{c.arm} beats {c.baseline}")
        lines.append(f"| {question} | {_ci(c.difference, spec='+.1f')} | {c.difference['n']} | {c.rule} | "
                     f"**{c.verdict}** |")
    return lines + [""] + decoupled_note(runs, k)


def decoupled_note(runs: list[Run], k: int) -> list[str]:
    """``frozen`` and ``distill`` never touch the policy: say whether their accuracy curves are
    those of ``detach``, seed by seed, as they must be (a check, not an assumption)."""
    out = []
    for arm in ("frozen", "distill"):
        pairs = [(r, d) for r in runs if r.regime == arm for d in runs if d.regime == "detach" and d.seed == r.seed]
        if pairs:
            same = sum(r.evaluations == d.evaluations for r, d in pairs)
            out.append(f"- `{arm}` trains only the MTP module: its held-out accuracy equals detach's at every "
                       f"evaluation in {same} of {len(pairs)} seeds (the policy is the same; only the MTP head differs).")
    return out + ([""] if out else [])


def terms_section(task: str, runs: list[Run]) -> list[str]:
    lines = [f"### {task}: correlation, cross term and penalty", "",
             "Along each arm's own MTP direction, J evaluated on the held-out batch; early and late are the first and "
             "last third of a run's instrumented updates; mean over seeds [95% t-interval].", "",
             "| arm | records | C early | C late | X early | X late | P early | P late |",
             "|---|---|---|---|---|---|---|---|"]
    for row in term_rows(runs):
        cells = [fmt_interval(row[f"{t}_{w}"], ".2e") for t in TERMS
                 for w in ("early", "late")]
        lines.append(f"| {row['arm']} | {row['records']} | " + " | ".join(cells) + " |")
    lines += ["", f"Distinguishable from 0: per run, the share of the arm's own direction's records whose |z| ≥ "
              f"{Z_DISTINGUISHABLE:g}, z = term/term_se (the record's sampling error over prompt groups, "
              "docs/estimators.md §5.1), then the mean over runs; n/a: the records carry no sampling error.", "",
              f"| arm | C: share with \\|z\\| ≥ {Z_DISTINGUISHABLE:g} | P: share with \\|z\\| ≥ {Z_DISTINGUISHABLE:g} |",
              "|---|---|---|"]
    lines += [f"| {row['regime']} | {distinguishable_cell(row['correlation'])} | {distinguishable_cell(row['penalty'])} |"
              for row in distinguishable_rows(runs)]
    return lines + [""]


def estimator_section(task: str, runs: list[Run]) -> list[str]:
    result = validate(runs, direction="policy")
    return [f"### {task}: the estimators against the realized optimum λ̂", "",
            "Policy direction, held-out records of every arm; each statistic per run, then the mean over clusters "
            "(runs sharing one policy trajectory count once) with a 95% bootstrap interval resampling clusters. Proxy "
            "estimators are not in the units of λ̂ (docs/estimators.md §4): only sign and within-run rank compare "
            "them; their realized efficiency only restates their scale and is not reported.", "",
            format_table(result, markdown=True), ""]


def claims_section(task: str, runs: list[Run]) -> list[str]:
    lines = [f"### {task}: the paper's claims", "", "| claim | statistic | 95% interval | rule | runs | records | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in evaluate_claims(runs):
        cells = [c.claim, c.statistic, c.interval, c.rule]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) +
                     f" | {c.n_runs} | {c.n_records} | **{c.verdict}** |")
    return lines + [""]


def design_section(timing: dict[str, Any] | None) -> list[str]:
    arms = ", ".join(f"`{a.label}`" for a in design.ARMS)
    lines = ["## Design", "",
             f"- Tasks: {', '.join(design.TASKS)}; seeds {', '.join(map(str, design.SEEDS))}; arms {arms}.",
             f"- Every arm: {design.STEPS} GRPO steps of the built-in model from the seed's shared warm start, "
             f"c = {design.SCALE:g}, held-out evaluation every 10 steps, the exact decomposition every "
             f"{design.COMMON['decomp_every']} steps for every direction on the train and held-out splits with the "
             "realized optimum λ̂.",
             f"- `occ` applies the paper's proxy as its public code computes it (`reference`); `occ-{design.BEST_ESTIMATOR}` "
             "the estimator that validated best in the pilot; `oracle` the held-out λ̂ of every update (0 where λ̂ is "
             "undefined); `oracle-b10` the same search inside a trust region |λ| ≤ 10c (its constrained optimum, ±10c "
             "included; added after `oracle` collapsed); `cosine` c·max(0, cos(∇J, −∇L_MTP)); `frozen` no MTP training; `distill` the draft "
             "objective, decoupled."]
    if timing:
        sessions = timing.get("sessions", [])
        wall = sum(s["wall_seconds"] for s in sessions)
        cpu = sum(timing.get("runs", {}).values())
        machines = sorted({s.get("machine") or f"{machine()} (the machine of this report)" for s in sessions})
        lines.append(f"- Measured: {len(timing.get('runs', {}))} runs, {cpu / 60:.0f} worker-minutes, "
                     f"{wall / 60:.0f} minutes wall over {len(sessions)} session(s) with "
                     f"{', '.join(str(s.get('workers')) for s in sessions)} worker(s) (`timing.json`); "
                     f"machine: {'; '.join(machines)}.")
    return lines + [""]


ROBUSTNESS = [
    "## Machines and seeds", "",
    "Seeded runs are bit-reproducible on one machine (tested) but not across CPUs: float reductions and "
    "library kernels differ between processors, the warm start stops at a different evaluation, and GRPO's "
    "sampling then follows another trajectory — a change of CPU acts on a run as a change of seed does. The "
    "study therefore never rests a verdict on one run: every verdict is a statement about the interval of a "
    "per-run statistic over seeds (the seeds of one task share nothing but the design), it holds or fails "
    "only when that interval clears its threshold, and it is `inconclusive` otherwise. A rerun on another "
    "machine draws another sample of trajectories; a verdict whose interval clears its threshold here is "
    "expected to survive it at the stated confidence, and the per-run numbers are expected to differ.", "",
]


def build(study: Path, pilot: Path | None, out: Path) -> str:
    k = design.FINAL_EVALUATIONS
    tasks = load_tasks(study)
    if not tasks:
        sys.exit(f"no study runs under {study}")
    timing_path = study / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else None
    figures = make_figures(tasks, out, k)
    lines = ["# The study", "", f"Generated on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `python -m analysis.report` "
             f"from {sum(len(r) for r in tasks.values())} run directories under `{study}`.", ""]
    lines += design_section(timing)
    if pilot is not None and pilot.is_dir():
        from analysis.pilot import pilot_section

        lines += pilot_section(load_tasks(pilot), k)
    lines += ["## Results", ""]
    for task, runs in tasks.items():
        lines += accuracy_section(task, runs, k) + verdict_section(task, runs, k) + terms_section(task, runs)
        lines += estimator_section(task, runs) + claims_section(task, runs)
    lines += ROBUSTNESS
    lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    return "\n".join(lines)


def readme_block(tasks: dict[str, list[Run]], k: int) -> str:
    """The README's few lines of main results, computed from the runs (``--readme``)."""
    from analysis.summaries import acceptance_rate, by_seed

    lines = [f"From the study ([figures/STUDY.md](figures/STUDY.md)): the built-in model, {len(design.SEEDS)} seeds per "
             f"arm, c = {design.SCALE:g}; final accuracy = mean of the last {k} held-out evaluations, differences to "
             "`detach` paired by seed with 95% t-intervals (points):", ""]
    for task, runs in tasks.items():
        cells = []
        for arm in regimes_of(runs):
            if arm in ("detach", "frozen", "distill"):
                continue
            c = (non_inferiority if arm.startswith("occ") else superiority)(runs, arm, "detach", k)
            question = "matches or beats detach" if arm.startswith("occ") else "beats detach"
            cells.append(f"{arm} {_ci(c.difference, spec='+.1f')} ({question}: {c.verdict})")
        lines.append(f"- **{task}** (`frozen` and `distill` leave the policy exactly as `detach`): " + "; ".join(cells) + ".")
    for task, runs in tasks.items():
        result = validate(runs, direction="policy")
        est = result["estimators"]
        ref, star = est.get("reference", {}), result.get("lambda_star", {})
        rho = ref.get("spearman", {})
        eff = star.get("realized_efficiency", star.get("median_efficiency", {}))
        acc = {a: t_mean(by_seed(runs, a, acceptance_rate)) for a in ("detach", "frozen", "distill", "ce") if
               any(r.regime == a for r in runs)}
        lines.append(f"- **{task}, estimators against the held-out realized optimum λ̂**: the paper's proxy has a "
                     f"within-run rank correlation of {fmt_interval(rho, '+.2f') if rho else '—'} with λ̂; the quadratic "
                     f"model's λ* realizes {fmt_interval(eff, '.2f') if eff else '—'} of λ̂'s gain. Draft acceptance "
                     "rate: " + ", ".join(f"{a} {v:.2f}" for a, v in acc.items()) + ".")
    return "\n".join(lines)


def t_mean(values: dict[int, float]) -> float:
    return sum(values.values()) / len(values) if values else float("nan")


def update_readme(block: str, readme: Path = Path("README.md")) -> None:
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        sys.exit(f"{readme} has no results markers")
    readme.write_text(text[: text.index(start) + len(start)] + "\n" + block + "\n" + text[text.index(end):])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="runs/study", help="the study's run root")
    ap.add_argument("--pilot", default="runs/pilot", help="the pilot's run root (skipped when absent)")
    ap.add_argument("--out", default="figures", help="where STUDY.md and the figures go")
    ap.add_argument("--readme", action="store_true", help="also rewrite README.md's main-results block")
    args = ap.parse_args(argv)
    out = Path(args.out)
    text = build(Path(args.study), Path(args.pilot), out)
    (out / "STUDY.md").write_text(text)
    print(f"written {out / 'STUDY.md'}")
    if args.readme:
        update_readme(readme_block(load_tasks(Path(args.study)), design.FINAL_EVALUATIONS))
        print("updated README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
