"""Figures from run directories (``decomp plot``).

One colour per regime throughout (Okabe–Ito, safe for colour-blind readers), one colour and
marker per estimator. Where a regime has several seeds, lines are the mean over seeds at each
step (a run's several values at one step averaged first, so each run counts once) and the band
is ± one standard deviation over seeds. Decomposition records are read on the held-out split
where a run has one, else on the training split.

Figures (``FIGURES``):

- ``terms_<direction>``: correlation ``C``, cross term ``X``, penalty ``P``, and predicted vs
  realized ``ΔJ_MTP`` over training, per regime, for the ``active``, ``ce`` and ``policy``
  directions, each with its 95% interval (:func:`term_series`): over runs (Student t) at a step
  where a regime has several runs, else the record's own sampling error ``±1.96·<term>_se``;
- ``coefficients``: top row, the realized optimum ``λ̂`` and the quadratic model's ``λ*`` of the
  ``policy`` direction (λ units); bottom row, every estimator and the ``λ`` an ``occ`` run
  applied, on their own axis (the proxies scale like ``c·lr``, not like ``λ``);
- ``proxy_vs_exact``: per estimator, the rank of each record's estimate within its run against
  the rank of its ``λ̂`` (``λ*`` when no record has ``λ̂``), with the mean within-run Spearman ρ
  and its run-bootstrap interval: scale-free, no magnitude is compared;
- ``efficiency``: per estimator in the units of ``λ`` (not the proxies: their efficiency only
  restates their scale) and the train batch's ``λ*`` against a ``λ̂`` of another batch, the
  median realized efficiency ``gain(λ_est)/gain(λ̂)`` of each run (points) and their mean over
  runs with its interval (the quadratic model's efficiency for records without ``λ̂``);
- ``quadratic_check``: realized ``ΔJ_MTP`` of real counterfactual steps over a grid of ``λ``
  (points) with the quadratic model ``λ(C₁+X₁) − λ²P₁`` (line), at the first and last sweep;
- ``training``: reward, held-out accuracy and MTP acceptance per regime;
- ``curvature``: extreme Hessian eigenvalues of ``J`` over training and the Rayleigh quotient of
  each direction's MTP displacement.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy import stats

from decomp.results.rundata import (
    Run,
    estimator_names,
    model_efficiency,
    realized_efficiency,
    regimes_of,
    split_of,
)
from decomp.results.figstyle import (
    TERM_LABELS,
    band,
    by_regime,
    direction_records,
    estimator_style,
    figure_legend,
    legend_note,
    no_data,
    regime_color,
    robust_ylim,
    save_figure,
    sci_axis,
    series,
    symlog,
)
from decomp.results.stats import CONFIDENCE, combine_runs, finite, fmt_interval, median
from decomp.results.validate import (
    TARGET_NAMES,
    estimator_stats,
    in_lambda_units,
    lambda_star_rows,
    select_records,
    target_of,
)
from decomp.rules import estimator_rules
from decomp.vocabulary import DIRECTIONS, TERMS

SMOOTH = 5  # instrumented updates in the rolling median of the term plots


def _field(direction: str, key: str) -> Callable[[Run], list[tuple[int, float]]]:
    """A run's ``(step, record[key])`` of ``direction`` on its preferred split."""
    return lambda run: [(r["step"], r.get(key)) for r in direction_records(run, direction)]


Z_95 = float(stats.norm.ppf(0.5 + CONFIDENCE / 2))  # 1.96: a record's interval, ± Z_95·SE


def _run_steps(run: Run, direction: str, key: str) -> dict[int, tuple[float, float]]:
    """Per step, the run's mean of ``key`` over its records there and that mean's sampling error
    ``√(Σ se²)/m`` from the records' ``<key>_se`` (``nan`` where one is missing)."""
    values: dict[int, list[tuple[float, float]]] = {}
    for r in direction_records(run, direction):
        if finite(r.get(key)):
            se = r.get(f"{key}_se")
            values.setdefault(r["step"], []).append((float(r[key]), float(se) if finite(se) else math.nan))
    return {s: (float(np.mean([v for v, _ in vs])), math.sqrt(sum(e * e for _, e in vs)) / len(vs))
            for s, vs in values.items()}


def term_series(runs: list[Run], direction: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Per step: the mean of ``key`` over runs (each run's records at the step averaged first) and
    the half-width of its 95% interval: ``t_{0.975, n−1}·sd/√n`` over the ``n ≥ 2`` runs there,
    else (one run) ``Z_95·SE`` of the run's value from its records' ``<key>_se`` (0 where they
    carry none). The last item says which intervals were drawn."""
    per_run = [_run_steps(run, direction, key) for run in runs]
    steps = np.array(sorted({s for p in per_run for s in p}))
    mean, half, kinds = [], [], set()
    for s in steps:
        here = [p[s] for p in per_run if s in p]
        vals = np.array([v for v, _ in here])
        mean.append(float(vals.mean()))
        if vals.size >= 2:
            half.append(float(stats.t.ppf(0.5 + CONFIDENCE / 2, vals.size - 1) * vals.std(ddof=1) / math.sqrt(vals.size)))
            kinds.add("over runs")
        elif finite(here[0][1]):
            half.append(Z_95 * here[0][1])
            kinds.add("sampling error")
        else:
            half.append(0.0)
    return steps, np.array(mean), np.array(half), " and ".join(sorted(kinds)) or "none"


def _term_panel(ax, groups: dict[str, list[Run]], direction: str, key: str) -> bool:
    raw: list[float] = []
    for regime, rs in groups.items():
        steps, mean, half, _ = term_series(rs, direction, key)
        band(ax, steps, mean, half, regime_color(regime), regime, smooth=SMOOTH)
        raw += list(mean)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_title(TERM_LABELS[key])
    ax.set_ylabel("ΔJ (reward units)")
    sci_axis(ax)
    return robust_ylim(ax, raw)


def _delta_panel(ax, groups: dict[str, list[Run]], direction: str) -> bool:
    raw: list[float] = []
    for regime, rs in groups.items():
        steps, mean, half, _ = term_series(rs, direction, "realized")
        band(ax, steps, mean, half, regime_color(regime), f"{regime} realized", smooth=SMOOTH)
        raw += list(mean)
        steps, mean, sd, _ = series(rs, _field(direction, "predicted"))
        band(ax, steps, mean, 0 * sd, regime_color(regime), f"{regime} predicted", style=":", smooth=SMOOTH)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_title("ΔJ_MTP: realized (solid) vs predicted C + X − P (dotted)")
    ax.set_ylabel("ΔJ (reward units)")
    sci_axis(ax)
    return robust_ylim(ax, raw)


def _splits_note(runs: list[Run], direction: str) -> str:
    splits = sorted({select_records(run, direction)[0] for run in runs if run.records(direction)})
    return f"{' and '.join(splits)} split" if splits else "no records"


def plot_terms(runs: list[Run], direction: str):
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), sharex=True)
    groups = by_regime(runs)
    clipped = False
    for ax, key in zip(axes.flat[:3], TERMS, strict=True):
        clipped |= _term_panel(ax, groups, direction, key)
    clipped |= _delta_panel(axes.flat[3], groups, direction)
    for ax in axes[1]:
        ax.set_xlabel("RL step")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure_legend(fig, handles, labels, 1.0)
    if not any(run.records(direction) for run in runs):
        for ax in axes.flat:
            no_data(ax, f"{direction}-direction records")
    note = "; y-range: 2–98% quantiles, outliers cut off" if clipped else ""
    kinds = {term_series(rs, direction, "correlation")[3] for rs in groups.values()}
    bands = ("95% band: over seeds (t-interval) where a regime has several runs, else ± 1.96 × the record's "
             f"sampling error over prompt groups; drawn here: {', '.join(sorted(kinds)) or 'none'}")
    fig.suptitle(f"Decomposition of the MTP effect, {direction} direction, {_splits_note(runs, direction)}\n"
                 f"({legend_note(runs)}; faint: each instrumented update, bold: rolling median of {SMOOTH}{note})\n"
                 f"{bands}", y=1.09)
    fig.tight_layout()
    return fig


def _lambda_panel(ax, rs: list[Run]) -> list[float]:
    """λ̂ and λ* of the policy direction over training (λ units); the values drawn."""
    drawn: list[float] = []
    for key, color, label, marker in (("lambda_hat", "#E69F00", "realized optimum λ̂", "s"),
                                      ("lambda_star", "black", "quadratic model's λ*", "o")):
        steps, mean, sd, _ = series(rs, _field("policy", key))
        band(ax, steps, mean, sd, color, label, marker=marker)
        drawn += list(mean)
    ax.axhline(0, color="black", lw=0.6)
    return drawn


def _estimate_panel(ax, rs: list[Run], regime: str, names: list[str]) -> list[float]:
    """Every estimator of the policy direction, and the λ an occ run applied (estimator units)."""
    drawn: list[float] = []
    if regime == "occ":
        steps, mean, _, _ = series(rs, lambda run: [(m["step"], m.get("mtp_coef")) for m in run.metrics if m["step"] > 0])
        ax.plot(steps, mean, "-", color=regime_color("occ"), lw=0.8, alpha=0.8, label="λ applied by the occ run (its estimate)")
        drawn += list(mean)
    for i, est in enumerate(names):
        color, marker = estimator_style(est, i)
        steps, mean, _, _ = series(rs, _field("policy", f"coef_{est}"))
        ax.plot(steps, mean, marker, color=color, ms=3.5, alpha=0.85, ls="none", label=est)
        drawn += list(mean)
    ax.axhline(0, color="black", lw=0.6)
    return drawn


def _unique_legend(fig, axes, y: float) -> None:
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    figure_legend(fig, handles, labels, y)


def plot_coefficients(runs: list[Run]):
    groups = by_regime(runs)
    n = max(len(groups), 1)
    names = estimator_names(r for run in runs for r in run.records("policy"))
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n + 0.6, 6.6), sharex="col", sharey="row", squeeze=False)
    lam: list[float] = []
    est: list[float] = []
    for col, (regime, rs) in enumerate(groups.items()):
        lam += _lambda_panel(axes[0, col], rs)
        est += _estimate_panel(axes[1, col], rs, regime, names)
        axes[0, col].set_title(f"{regime} run")
        axes[1, col].set_xlabel("RL step")
    for ax in axes[0]:
        symlog(ax, "y", 1e-3, lam)
    nonzero = [abs(v) for v in est if finite(v) and v != 0]
    for ax in axes[1]:
        symlog(ax, "y", float(np.percentile(nonzero, 10)) if nonzero else 1e-4, est)
    axes[0, 0].set_ylabel("λ units (symlog)")
    axes[1, 0].set_ylabel("estimate, estimator units ∝ c·lr\n(not λ units; symlog)")
    _unique_legend(fig, axes[0], 1.04)
    _unique_legend(fig, axes[1], 0.5)
    fig.suptitle("Optimal coefficient of the policy MTP loss (top: λ̂ and λ*, λ units) and the estimators "
                 "(bottom: own units, compare signs and trends, not magnitudes)", y=1.09)
    fig.tight_layout(h_pad=3.5)
    return fig


def _ranks(values: np.ndarray) -> np.ndarray:
    """Within-run ranks scaled to (0, 1): ``(rank − ½)/n`` (average ranks for ties)."""
    return (stats.rankdata(values) - 0.5) / values.size


def _rank_points(runs: list[Run], est: str, target: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Each run's records as (rank of the target, rank of the estimate) within the run."""
    xs, ys, regs = [], [], []
    for run in runs:
        rows = [r for r in direction_records(run, "policy") if finite(r.get(target)) and finite(r.get(f"coef_{est}"))]
        tgt = np.array([r[target] for r in rows], dtype=float)
        val = np.array([r[f"coef_{est}"] for r in rows], dtype=float)
        if len(rows) < 2 or np.ptp(tgt) == 0 or np.ptp(val) == 0:
            continue  # no ranking within this run (and no within-run ρ)
        xs += list(_ranks(tgt))
        ys += list(_ranks(val))
        regs += [run.regime] * len(rows)
    return np.array(xs), np.array(ys), regs


def _rank_panel(ax, runs: list[Run], groups: list[list[dict[str, Any]]], est: str, target: str) -> None:
    x, y, regs = _rank_points(runs, est, target)
    for regime in regimes_of(runs):
        sel = np.array([g == regime for g in regs], dtype=bool)
        if sel.any():
            ax.scatter(x[sel], y[sel], s=12, color=regime_color(regime), alpha=0.75, label=regime, edgecolors="none")
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
    rho = estimator_stats(groups, est, target)["spearman"]
    ax.set_title(f"{est}\nρ within runs {fmt_interval(rho)}\n{rho['n_runs']} runs, {rho['n_records']} records",
                 fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


def plot_proxy_vs_exact(runs: list[Run]):
    groups = [g for g in (direction_records(run, "policy") for run in runs) if g]
    target = target_of(groups)
    names = estimator_names(r for g in groups for r in g) or list(estimator_rules())
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.9), squeeze=False, sharey=True)
    for ax, est in zip(axes[0], names, strict=True):
        _rank_panel(ax, runs, groups, est, target)
        ax.set_xlabel(f"rank of {'λ̂' if target == 'lambda_hat' else 'λ*'} within its run")
    axes[0, 0].set_ylabel("rank of the estimate within its run")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure_legend(fig, handles, labels, 1.02, title="run regime (points: instrumented updates; dashed: same rank)",
                   title_fontsize=8)
    fig.suptitle(f"Estimators against {TARGET_NAMES[target]}, policy direction: ranks within each run "
                 "(scale-free; 95% interval: run bootstrap)", y=1.16)
    fig.tight_layout()
    return fig


def _efficiency_columns(runs: list[Run]) -> tuple[str, list[tuple[str, list[float], int]]]:
    """Per estimator in the units of λ (a proxy's efficiency only restates its scale) and λ*: the
    median efficiency of each run and the records behind them; realized efficiency where records
    carry λ̂, else the quadratic model's. λ* is the train batch's, judged against a λ̂ of another
    batch (:func:`decomp.results.validate.lambda_star_rows`)."""
    groups = [g for g in (direction_records(run, "policy") for run in runs) if g]
    realized = any("gain_hat" in r for g in groups for r in g)
    get = realized_efficiency if realized else model_efficiency
    columns = []
    for est in estimator_names(r for g in groups for r in g):
        if not in_lambda_units(est):
            continue
        per_run = [[get(r, est) for r in g] for g in groups]
        columns.append((est, [median(v) for v in per_run], sum(finite(x) for v in per_run for x in v)))
    if realized:
        per_run = [[row["efficiency"] for row in lambda_star_rows(run, "policy")[1] if finite(row["efficiency"])]
                   for run in runs]
        if any(per_run):
            columns.append(("λ*", [median(v) for v in per_run], sum(len(v) for v in per_run)))
    return ("realized gain(λ_est)/gain(λ̂)" if realized else "model gain(λ_est)/gain(λ*) (no λ̂ recorded)"), columns


def plot_efficiency(runs: list[Run]):
    kind, columns = _efficiency_columns(runs)
    fig, ax = plt.subplots(figsize=(max(7.5, 1.4 * len(columns) + 1), 3.9))
    labels = []
    for i, (est, per_run, n_records) in enumerate(columns):
        vals = np.array([v for v in per_run if finite(v)])
        comb = combine_runs(vals, n_records=n_records)
        labels.append(f"{est}\n({comb['n_runs']} runs,\n{n_records} rec.)")
        if vals.size:
            jitter = np.random.default_rng(i).uniform(-0.15, 0.15, vals.size)
            ax.scatter(i + jitter, vals, s=14, alpha=0.7, color=estimator_style(est, i)[0] if est != "λ*" else "black",
                       edgecolors="none")
            lo, hi = comb["low"], comb["high"]
            if finite(lo) and finite(hi):
                ax.errorbar(i + 0.3, comb["value"], yerr=[[comb["value"] - lo], [hi - comb["value"]]], fmt="D",
                            color="black", ms=4, capsize=3)
    ax.axhline(1, color="#009E73", lw=1, ls="--", label="1: as good as the optimum")
    ax.axhline(0, color="black", lw=0.8, label="0: no gain (≤ 0 hurts)")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xticks(np.arange(len(columns)), labels)
    ax.set_ylabel(f"{kind}\n(median per run; symlog)")
    ax.set_title("Efficiency per estimator in λ units, policy direction (points: runs; diamond: mean over runs, "
                 "95% run-bootstrap interval;\nproxies left out: their efficiency only restates their scale)",
                 fontsize=9)
    ax.legend(loc="lower left", fontsize=7)
    if not columns:
        no_data(ax, "estimator efficiencies")
    fig.tight_layout()
    return fig


def plot_quadratic_check(runs: list[Run]):
    picks = []
    for run in runs:
        pol = [s for s in run.sweeps if s["direction"] == "policy"]
        held = [s for s in pol if split_of(s) == "heldout"]
        pol = held or [s for s in pol if split_of(s) == "train"]
        if pol:
            picks.append((run, pol[0]))
            if len(pol) > 1:
                picks.append((run, pol[-1]))
    picks = picks[:8]
    if not picks:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.text(0.5, 0.5, "no coefficient sweeps in these runs", ha="center", va="center")
        ax.set_axis_off()
        return fig
    cols = min(4, len(picks))
    rows = math.ceil(len(picks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False)
    for ax, (run, sw) in zip(axes.flat, picks, strict=False):
        lam = np.array(sw["coefs"], dtype=float)
        real = np.array(sw["realized"], dtype=float)
        dense = np.linspace(lam.min(), lam.max(), 200)
        quad_pts = np.array(sw["quadratic"], dtype=float)
        # the model is a parabola through 0: recover its coefficients from the recorded points
        nz = lam != 0
        a, b = np.polyfit(lam[nz], quad_pts[nz] / lam[nz], 1) if nz.sum() >= 2 else (0.0, 0.0)
        ax.plot(dense, a * dense * dense + b * dense, color=regime_color(run.regime), lw=1.5, label="quadratic model")
        ax.scatter(lam, real, s=16, color="black", zorder=3, label="real AdamW step")
        if finite(sw.get("lambda_star")):
            ax.axvline(sw["lambda_star"], color="gray", ls="--", lw=0.8, label="λ*")
        if finite(sw.get("lambda_hat")):
            ax.axvline(sw["lambda_hat"], color="#E69F00", ls=":", lw=1.0, label="λ̂")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"{run.regime} s{run.seed}, step {sw['step']}")
        ax.set_xlabel("coefficient λ")
        ax.set_ylabel("ΔJ_MTP")
        sci_axis(ax)
    for ax in list(axes.flat)[len(picks):]:
        ax.set_axis_off()
    axes.flat[0].legend(loc="best", fontsize=7)
    fig.suptitle("Quadratic model vs real counterfactual steps (policy direction)", y=1.02)
    fig.tight_layout()
    return fig


def plot_training(runs: list[Run]):
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    groups = by_regime(runs)
    specs = [("reward_mean", "mean reward (rollouts, 10-step mean)", 10), ("accuracy", "held-out greedy accuracy", 1),
             ("mtp_acceptance", "MTP acceptance (10-step mean)", 10)]
    for ax, (key, title, window) in zip(axes, specs, strict=True):
        for regime, rs in groups.items():
            def get(run, k=key, w=window):
                pts = [(m["step"], m.get(k)) for m in run.metrics if finite(m.get(k))]
                if w > 1 and len(pts) >= w:
                    steps = [p[0] for p in pts]
                    vals = np.convolve([p[1] for p in pts], np.ones(w) / w, mode="valid")
                    return list(zip(steps[w - 1 :], vals, strict=True))
                return pts

            steps, mean, sd, _ = series(rs, get)
            band(ax, steps, mean, sd, regime_color(regime), regime)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.set_ylabel("fraction")
    axes[0].legend(loc="best")
    fig.suptitle(f"Training ({legend_note(runs)})", y=1.02)
    fig.tight_layout()
    return fig


def plot_curvature(runs: list[Run]):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    groups = by_regime(runs)
    for regime, rs in groups.items():
        for key, style in (("eigenvalue_max", "-"), ("eigenvalue_min", "--")):
            steps, mean, sd, _ = series(rs, lambda run, k=key: [(c["step"], c[k]) for c in run.curvature])
            band(axes[0], steps, mean, sd, regime_color(regime), regime if key.endswith("max") else None, style=style,
                  marker="o")
    axes[0].axhline(0, color="black", lw=0.5)
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[0].set_title("extreme eigenvalues of ∇²J\n(solid: largest, dashed: smallest)")
    axes[0].set_xlabel("RL step")
    axes[0].set_ylabel("eigenvalue (symlog)")
    for ax, direction in zip(axes[1:], ("policy", "ce"), strict=True):
        for regime, rs in groups.items():
            def rq(run, d=direction):
                pts = []
                for r in direction_records(run, d):
                    n = r.get("displacement_norm")
                    if finite(n) and n > 0:
                        pts.append((r["step"], -2.0 * r["penalty"] / (n * n)))
                return pts

            steps, mean, sd, _ = series(rs, rq)
            band(ax, steps, mean, sd, regime_color(regime), None, marker="o")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(f"Rayleigh quotient δᵀHδ/δᵀδ\nof the {direction} MTP displacement")
        ax.set_xlabel("RL step")
        ax.set_ylabel("curvature of J along δ (symlog)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure_legend(fig, handles, labels, 1.02, title="run regime", title_fontsize=8)
    if not any(run.curvature for run in runs):
        no_data(axes[0], "eigenvalue records")
    fig.suptitle("Curvature of J: the ends of the spectrum, and where the MTP displacement sits", y=1.1)
    fig.tight_layout()
    return fig


FIGURES: dict[str, Callable[[list[Run]], Any]] = {
    **{f"terms_{d}": (lambda runs, d=d: plot_terms(runs, d)) for d in DIRECTIONS},
    "coefficients": plot_coefficients,
    "proxy_vs_exact": plot_proxy_vs_exact,
    "efficiency": plot_efficiency,
    "quadratic_check": plot_quadratic_check,
    "training": plot_training,
    "curvature": plot_curvature,
}


def make_figures(runs: list[Run], out: Path, pdf: bool = False) -> list[Path]:
    """Write every figure of ``FIGURES`` to ``out`` (PNG, and PDF with ``pdf``); return the paths."""
    written: list[Path] = []
    for name, fn in FIGURES.items():
        written += save_figure(fn(runs), Path(out), name, pdf)
    return written
