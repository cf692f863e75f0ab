"""``decomp report``: a Markdown report of run directories.

Sections: held-out accuracy per regime (mean ± sd over seeds, with the seeds named); early vs
late correlation and penalty per regime and direction (per run: means over the first and last
third of its instrumented steps, then the mean over runs); per regime, the share of its own
direction's records whose ``C`` and ``P`` are distinguishable from 0 (``|z| ≥ 2``,
``z = term/term_se``; :func:`distinguishable_rows`); the estimator validation table
(:mod:`decomp.results.validate`, per-run statistics combined over runs); the claims table
(:mod:`decomp.results.claims`: statistic, interval, rule, runs, records and verdict of each); the
figures, when a figure folder is given. Nothing in it is written by hand.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from decomp import __version__
from decomp.results.claims import INTERVAL, MIN_RUNS, evaluate_claims
from decomp.results.plots import FIGURES
from decomp.results.rundata import FINAL_EVALUATIONS, Run, regimes_of
from decomp.results.stats import Z_DISTINGUISHABLE, distinguishable_share, early_late, finite_array, fmt
from decomp.results.validate import format_table, validate
from decomp.vocabulary import DIRECTIONS



def _mean_sd(values: list[float]) -> str:
    vals = finite_array(values)
    if not vals.size:
        return "nan"
    if vals.size == 1:
        return f"{100 * vals[0]:.1f}%"
    return f"{100 * np.mean(vals):.1f}% ± {100 * np.std(vals, ddof=1):.1f}"


def accuracy_table(runs: list[Run]) -> str:
    k = FINAL_EVALUATIONS
    lines = [(f"| regime | seeds | warm-start accuracy | last evaluation | final (mean of last {k} evaluations) | "
             "change (points) |"), "|---|---|---|---|---|---|"]
    for regime in regimes_of(runs):
        rs = [r for r in runs if r.regime == regime]
        change = finite_array([100 * (r.final_accuracy_mean() - r.warm_accuracy) for r in rs])
        lines.append(
            f"| {regime} | {', '.join(str(r.seed) for r in rs)} | {_mean_sd([r.warm_accuracy for r in rs])} | "
            f"{_mean_sd([r.final_accuracy for r in rs])} | {_mean_sd([r.final_accuracy_mean() for r in rs])} | "
            f"{fmt(float(np.mean(change)) if change.size else float('nan'), '+.1f')} |"
        )
    return "\n".join(lines)


def _terms_of_run(run: Run, direction: str) -> tuple[str, list[float], int] | None:
    """Split used, (C early, C late, P early, P late) and records of one run's direction."""
    split = run.preferred_split(direction)
    recs = run.records(direction, split)
    steps = [r["step"] for r in recs]
    c_e, c_l, n = early_late(steps, [r["correlation"] for r in recs])
    p_e, p_l, _ = early_late(steps, [r["penalty"] for r in recs])
    return (split, [c_e, c_l, p_e, p_l], n) if n else None


def _terms_row(runs: list[Run], regime: str, direction: str) -> str | None:
    rs = [r for r in runs if r.regime == regime]
    per_run = [(run, t) for run in rs if (t := _terms_of_run(run, direction)) is not None]
    if not per_run:
        return None
    values = np.array([t[1] for _, t in per_run], dtype=float)
    means = [fmt(float(np.mean(col[np.isfinite(col)])) if np.isfinite(col).any() else float("nan"))
             for col in values.T]
    splits = ", ".join(sorted({t[0] for _, t in per_run}))
    copy = " (= active)" if all(run.copies(direction) == len(run.records(direction)) for run, _ in per_run) else ""
    return (f"| {regime} | {direction}{copy} | {splits} | {len(per_run)} | {sum(t[2] for _, t in per_run)} | "
            + " | ".join(means) + " |")


def terms_table(runs: list[Run]) -> str:
    lines = ["| regime | direction | split | runs | records | C early | C late | P early | P late |",
             "|---|---|---|---|---|---|---|---|---|"]
    for regime in regimes_of(runs):
        lines += [row for d in DIRECTIONS if (row := _terms_row(runs, regime, d)) is not None]
    return "\n".join(lines)


def distinguishable_rows(runs: list[Run], direction: str = "active") -> list[dict[str, object]]:
    """Per regime: for ``C`` (``correlation``) and ``P`` (``penalty``), the mean over its runs of
    the per-run share of ``direction``'s records (preferred split) with ``|term/term_se| ≥ 2``
    (:func:`decomp.results.stats.distinguishable_share`), the runs and records with an SE behind
    it; ``value`` is ``nan`` where no record carries one."""
    rows = []
    for regime in regimes_of(runs):
        row: dict[str, object] = {"regime": regime}
        for term in ("correlation", "penalty"):
            per_run = [distinguishable_share(run.records(direction, run.preferred_split(direction)), term)
                       for run in runs if run.regime == regime]
            used = [(share, n) for share, n in per_run if n]
            row[term] = {"value": float(np.mean([s for s, _ in used])) if used else float("nan"),
                         "n_runs": len(used), "n_records": sum(n for _, n in used)}
        rows.append(row)
    return rows


def distinguishable_cell(d: dict[str, object]) -> str:
    """``0.83 (3 runs, 30 records)``, or ``n/a`` where no record carries a sampling error."""
    if not d["n_runs"]:
        return "n/a (no sampling errors)"
    return f"{fmt(d['value'], '.2f')} ({d['n_runs']} runs, {d['n_records']} records)"


def distinguishable_table(runs: list[Run], direction: str = "active") -> str:
    lines = [f"| regime | C: share with \\|z\\| ≥ {Z_DISTINGUISHABLE:g} | P: share with \\|z\\| ≥ {Z_DISTINGUISHABLE:g} |",
             "|---|---|---|"]
    lines += [f"| {row['regime']} | {distinguishable_cell(row['correlation'])} | {distinguishable_cell(row['penalty'])} |"
              for row in distinguishable_rows(runs, direction)]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a literal | would split the Markdown cell


def claims_table(runs: list[Run]) -> str:
    lines = ["| claim | statistic | 95% interval | rule | runs | records | verdict |", "|---|---|---|---|---|---|---|"]
    for c in evaluate_claims(runs):
        lines.append(f"| {_cell(c.claim)} | {_cell(c.statistic)} | {_cell(c.interval or '–')} | {_cell(c.rule)} | "
                     f"{c.n_runs} | {c.n_records} | **{c.verdict}** |")
    return "\n".join(lines)


def _figure_links(out: Path, figures: Path) -> list[str]:
    rel = Path(os.path.relpath(Path(figures).resolve(), Path(out).resolve().parent))
    return [f"![{name}]({(rel / f'{name}.png').as_posix()})" for name in FIGURES
            if (Path(figures) / f"{name}.png").exists()]


def scope_note(runs: list[Run]) -> list[str]:
    """What these runs can and cannot conclude: with fewer than ``MIN_RUNS`` seeds per regime,
    nothing about regimes (every such claim is ``inconclusive``); what stays measured per update."""
    seeds = {r.regime: len({x.seed for x in runs if x.regime == r.regime}) for r in runs}
    if min(seeds.values()) >= MIN_RUNS:
        return []
    return ["**What these runs can conclude.** "
            f"{', '.join(f'{k}: {v} seed(s)' for k, v in seeds.items())}. Fewer than {MIN_RUNS} seeds per regime "
            "cannot tell regimes apart: accuracy differences between them are within what another seed (or "
            "another CPU) changes, and every claim about regimes below is `inconclusive` by rule. What one run "
            "does measure, update by update, is the decomposition itself — correlation, cross term and penalty, "
            "the Taylor residual of the second-order model, λ* against the realized optimum λ̂ — and how each "
            "estimator tracks λ̂ within the run."]


def build_report(runs: list[Run], out: Path, figures: Path | None = None) -> str:
    """The report's Markdown; figure links are relative to ``out``'s folder."""
    result = validate(runs)
    sections = [
        "# decomp report",
        f"Generated by decomp {__version__} on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from "
        f"{len(runs)} run(s): " + ", ".join(f"`{r.path}`" for r in runs) + ".",
        *scope_note(runs),
        "## Held-out accuracy",
        (f"Greedy decoding on the task's fixed held-out set; mean ± sd over seeds. The final accuracy of a run is "
         f"the mean of its last {FINAL_EVALUATIONS} evaluations (all when fewer), the summary the OCC claim pairs."),
        accuracy_table(runs),
        "## Correlation and penalty, early vs late",
        ("Per run: means over the first and last third of its instrumented steps (ΔJ units), on the held-out split "
         "where the run has one; then the mean over runs. `(= active)`: that direction is the active one, its "
         "records are copies of the active records."),
        terms_table(runs),
        (f"Terms distinguishable from 0: per run, the share of the regime's own (`active`) direction's records "
         f"whose |z| ≥ {Z_DISTINGUISHABLE:g}, z = term/term_se (the record's sampling error over prompt groups, "
         "docs/estimators.md §5.1); then the mean over runs. `n/a`: the records carry no sampling error "
         "(`group_errors` off, or an older run)."),
        distinguishable_table(runs),
        "## Estimators against the optimal coefficient",
        format_table(result, markdown=True),
        "## The paper's claims on this data",
        (f"Each verdict follows from the stated rule: per-run statistics, then a {INTERVAL} (the run is the unit "
         f"of replication); a claim about regimes or seeds needs ≥ {MIN_RUNS} runs (paired seeds). `inconclusive` "
         "means too few runs or an interval that straddles a threshold."),
        claims_table(runs),
    ]
    if figures is not None:
        sections.append("## Figures")
        sections += _figure_links(out, figures)
    return "\n\n".join(sections) + "\n"

