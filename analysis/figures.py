"""The study's figures (``figures/study_*.png``), one function each, from run directories.

Each figure stands alone: title, axis units, the number of seeds, and 95% intervals over seeds
(t-intervals of per-run values). Colours per arm follow :mod:`decomp.results.plots`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.summaries import acceptance_rate, by_seed, final_accuracy  # noqa: E402
from decomp.results.figstyle import REGIME_COLORS  # noqa: E402
from decomp.results.rundata import Run, regimes_of  # noqa: E402
from decomp.results.stats import finite, median, paired_difference, spearman, t_interval  # noqa: E402
from decomp.results.validate import (  # noqa: E402
    in_lambda_units,
    lambda_star_rows,
    per_run_estimator,
    select_records,
)

plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 130, "font.size": 9, "axes.titlesize": 10,
                     "legend.fontsize": 8, "axes.grid": True, "grid.alpha": 0.3,
                     "axes.spines.top": False, "axes.spines.right": False})
EXTRA = ["#332288", "#117733", "#44AA99", "#88CCEE", "#DDCC77", "#CC6677", "#AA4499"]


# occ's controls (the controls design): occ's own hue family is taken by the estimator arms
CONTROL_COLORS = {"occ-random-sign": "#AA4499", "occ-star-magnitude": "#332288"}


def color(arm: str) -> str:
    if arm in REGIME_COLORS:
        return REGIME_COLORS[arm]
    if arm in CONTROL_COLORS:
        return CONTROL_COLORS[arm]
    if arm.startswith("occ-"):
        return "#E69F00"
    return EXTRA[sum(map(ord, arm)) % len(EXTRA)]


def _n_seeds(runs: list[Run]) -> int:
    return max((len({r.seed for r in runs if r.regime == a}) for a in regimes_of(runs)), default=0)


def _errorbar(ax, x, ci, c, clip=(-math.inf, math.inf), **kw) -> None:
    """A mean with its interval, the interval's ends clipped to the quantity's range ``clip``."""
    if finite(ci["low"]):
        low, high = max(ci["low"], clip[0]), min(ci["high"], clip[1])
        ax.errorbar([x], [ci["value"]], yerr=[[ci["value"] - low], [high - ci["value"]]], fmt="o",
                    color=c, capsize=3, ms=5, **kw)
    elif finite(ci["value"]):
        ax.plot([x], [ci["value"]], "o", color=c, ms=5, **kw)


def accuracy_figure(tasks: dict[str, list[Run]], k: int):
    """Final held-out accuracy per arm (dots: seeds; bar: mean and 95% CI) and the paired
    difference to detach with its 95% CI and the −2-point margin."""
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.2 * len(tasks), 6.2), squeeze=False)
    for col, (task, runs) in enumerate(tasks.items()):
        arms = regimes_of(runs)
        base = by_seed(runs, "detach", lambda r: final_accuracy(r, k))
        for i, arm in enumerate(arms):
            acc = by_seed(runs, arm, lambda r: final_accuracy(r, k))
            axes[0, col].plot([i] * len(acc), [100 * v for v in acc.values()], ".", color=color(arm), alpha=0.5)
            ci = t_interval(list(acc.values()))
            _errorbar(axes[0, col], i, {k_: 100 * v for k_, v in ci.items() if k_ in ("value", "low", "high")}, color(arm),
                      clip=(0, 100))
            if arm != "detach":
                d = paired_difference(acc, base)
                _errorbar(axes[1, col], i, {k_: 100 * d[k_] for k_ in ("value", "low", "high")}, color(arm))
        for row, label in ((0, "final held-out accuracy (%)"), (1, "paired difference to detach (points)")):
            axes[row, col].set_xticks(range(len(arms)), arms, rotation=35, ha="right")
            axes[row, col].set_ylabel(label)
        axes[1, col].axhline(0, color="black", lw=0.8)
        axes[1, col].axhline(-2, color="gray", lw=0.8, ls="--", label="−2-point margin")
        axes[0, col].set_ylim(0, 100)
        axes[0, col].set_title(f"{task}: mean of the last {k} evaluations, n = {_n_seeds(runs)} seeds")
        axes[1, col].legend(loc="lower left")
    fig.suptitle("Final accuracy per arm (dots: seeds; bars: mean and 95% t-interval over seeds, clipped to 0–100%)",
                 y=1.0)
    fig.tight_layout()
    return fig


def _curve(runs: list[Run], get) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per step: mean over runs and the 95% t-interval (runs with a finite value there)."""
    values: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for step, v in get(run):
            if finite(v):
                values[step].append(float(v))
    steps = np.array(sorted(values))
    cis = [t_interval(values[s]) for s in steps]
    mean = np.array([c["value"] for c in cis])
    low = np.array([c["low"] if finite(c["low"]) else c["value"] for c in cis])
    high = np.array([c["high"] if finite(c["high"]) else c["value"] for c in cis])
    return steps, mean, low, high


def _band(ax, runs, arm, get, scale=1.0) -> None:
    steps, mean, low, high = _curve([r for r in runs if r.regime == arm], get)
    if steps.size:
        ax.plot(steps, scale * mean, color=color(arm), lw=1.4, label=arm)
        ax.fill_between(steps, scale * low, scale * high, color=color(arm), alpha=0.12, lw=0)


def _accuracy_points(run: Run) -> list[tuple[int, float]]:
    return [(m["step"], m.get("accuracy")) for m in run.metrics]


def _paired_points(run: Run, base: Run | None) -> list[tuple[int, float]]:
    """``run``'s accuracy minus its seed's detach run's, at the evaluations both have."""
    if base is None:
        return []
    ref = dict(_accuracy_points(base))
    return [(s, v - ref[s]) for s, v in _accuracy_points(run) if finite(v) and finite(ref.get(s))]


def training_figure(tasks: dict[str, list[Run]]):
    """Held-out greedy accuracy over training per arm: the mean over seeds (top), and the paired
    difference to the same seed's detach run with its 95% band (bottom; warm starts differ much
    more between seeds than arms do within one)."""
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7.0), squeeze=False)
    for col, (task, runs) in enumerate(tasks.items()):
        detach = {r.seed: r for r in runs if r.regime == "detach"}
        for arm in regimes_of(runs):
            steps, mean, _, _ = _curve([r for r in runs if r.regime == arm], _accuracy_points)
            axes[0, col].plot(steps, 100 * mean, color=color(arm), lw=1.3, label=arm,
                              ls="--" if arm in ("frozen", "distill") else "-")
            if arm not in ("detach", "frozen", "distill"):
                _band(axes[1, col], runs, arm, lambda r: _paired_points(r, detach.get(r.seed)), scale=100)
        axes[1, col].axhline(0, color="black", lw=0.8)
        axes[0, col].set_title(f"{task}: mean over n = {_n_seeds(runs)} seeds")
        axes[1, col].set_title(f"{task}: arm − detach, same seed (mean and 95% band)")
        for row, label in ((0, "held-out greedy accuracy (%)"), (1, "difference to detach (points)")):
            axes[row, col].set_xlabel("RL step")
            axes[row, col].set_ylabel(label)
    axes[0, -1].legend(loc="lower left", ncol=2, fontsize=7)
    fig.suptitle("Held-out accuracy during RL (frozen and distill: the detach policy, dashed)", y=1.01)
    fig.tight_layout()
    return fig


TERMS = (("correlation", "correlation C = ⟨∇J, δ⟩"), ("cross", "cross term X = u_RLᵀHδ"),
         ("penalty", "penalty P = −½δᵀHδ"))


PHASES = ("early", "middle", "late")
TRUNK_ARMS = ("ce", "policy", "occ", "cosine")  # arms whose MTP term reaches the policy (and their variants)


def _phase_means(run: Run, term: str, direction: str, split: str) -> list[float]:
    """The run's mean of ``term`` over the first, middle and last third of its instrumented steps."""
    recs = sorted(run.records(direction, split), key=lambda r: r["step"])
    thirds = np.array_split(np.arange(len(recs)), 3) if len(recs) >= 3 else []
    return [float(np.mean([recs[i][term] for i in idx])) for idx in thirds] if thirds else [math.nan] * 3


def terms_figure(tasks: dict[str, list[Run]], direction: str = "active", split: str = "heldout"):
    """C, X and P of each arm's own MTP direction in the early, middle and late third of training
    (held-out J): per run the phase mean, then the mean over seeds with its 95% t-interval."""
    fig, axes = plt.subplots(len(tasks), 3, figsize=(14, 3.6 * len(tasks)), squeeze=False)
    for row, (task, runs) in enumerate(tasks.items()):
        arms = [a for a in regimes_of(runs) if a.split("-")[0] in TRUNK_ARMS or a.startswith("oracle")]
        for col, (term, label) in enumerate(TERMS):
            ax = axes[row, col]
            for i, arm in enumerate(arms):
                per_run = [_phase_means(r, term, direction, split) for r in runs if r.regime == arm]
                for ph in range(3):
                    ci = t_interval([p[ph] for p in per_run])
                    _errorbar(ax, ph + (i - len(arms) / 2) * 0.08, ci, color(arm), label=arm if ph == 0 else None)
            ax.axhline(0, color="black", lw=0.6)
            ax.set_yscale("symlog", linthresh=1e-6)
            ax.set_xticks(range(3), PHASES)
            ax.set_title(f"{task}: {label}")
            ax.set_ylabel("change of J per update (symlog)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(f"The decomposition along each arm's own MTP direction by thirds of training ({split} J; mean and "
                 f"95% t-interval over seeds of the per-run means; detach, frozen and distill are exactly 0)", y=1.04)
    fig.tight_layout()
    return fig


def estimator_figure(tasks: dict[str, list[Run]], direction: str = "policy"):
    """Per estimator: realized efficiency ΔJ(λ_est)/ΔJ(λ̂) (per-run medians and 95% CI over runs;
    estimators in λ units only: a proxy's efficiency only restates its scale) and the within-run
    Spearman ρ with λ̂, on held-out records of the policy direction; ``lambda_star`` is the train
    batch's λ* against a λ̂ of another batch (:func:`decomp.results.validate.lambda_star_rows`)."""
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 6.4), squeeze=False)
    for col, (task, runs) in enumerate(tasks.items()):
        chosen = [(r, g) for r in runs if (g := select_records(r, direction)[1])]
        groups = [g for _, g in chosen]
        names = sorted({k[5:] for g in groups for rec in g for k in rec if k.startswith("coef_") and k != "coef_"})
        names = ["lambda_star", *[n for n in names if n != "lambda_star"]]
        for i, name in enumerate(names):
            per_run = [_per_run(run, g, name, direction) for run, g in chosen]
            for row, key, clip in ((0, "median_efficiency", (-2, 1.2)), (1, "spearman", (-1, 1))):
                vals = [min(max(p[key], clip[0]), clip[1]) for p in per_run if finite(p[key])]
                axes[row, col].plot([i] * len(vals), vals, ".", color="gray", alpha=0.4)
                _errorbar(axes[row, col], i, t_interval(vals), "#0072B2")
        for row, label in ((0, "realized efficiency (median per run;\nλ units only)"),
                           (1, "within-run Spearman ρ with λ̂")):
            axes[row, col].set_xticks(range(len(names)), names, rotation=35, ha="right")
            axes[row, col].set_ylabel(label)
            axes[row, col].axhline(0, color="black", lw=0.6)
        axes[0, col].axhline(1, color="#009E73", lw=0.8, ls="--")
        axes[0, col].set_title(f"{task}: {len(groups)} runs (points: runs, clipped to the axis)")
    fig.suptitle("How well each coefficient tracks the held-out realized optimum λ̂ (policy direction)", y=1.01)
    fig.tight_layout()
    return fig


def _per_run(run: Run, records: list[dict], name: str, direction: str) -> dict[str, float]:
    """One run's median efficiency and within-run ρ of ``name``: for ``lambda_star`` the train
    batch's λ* against a λ̂ of another batch (never a record's own λ* against its own λ̂); the
    efficiency of an estimator not in λ units is left out (``nan``)."""
    if name == "lambda_star":
        rows = [r for r in lambda_star_rows(run, direction)[1] if finite(r["star"]) and finite(r["hat"])]
        return {"median_efficiency": median([r["efficiency"] for r in rows]),
                "spearman": spearman([r["star"] for r in rows], [r["hat"] for r in rows])}
    stats = per_run_estimator(records, name)
    return stats if in_lambda_units(name) else stats | {"median_efficiency": math.nan}


def tradeoff_figure(tasks: dict[str, list[Run]], k: int):
    """The reason to keep an MTP head: its acceptance rate as a speculative draft, against the
    policy's final accuracy, per arm (mean and 95% CI over seeds on both axes)."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, (task, runs) in zip(axes[0], tasks.items(), strict=True):
        for arm in regimes_of(runs):
            x = t_interval(list(by_seed(runs, arm, acceptance_rate).values()))
            y = t_interval(list(by_seed(runs, arm, lambda r: final_accuracy(r, k)).values()))
            if not (finite(x["value"]) and finite(y["value"])):
                continue
            xerr = ([[x["value"] - max(x["low"], 0)], [min(x["high"], 1) - x["value"]]] if finite(x["low"]) else None)
            yerr = ([[100 * (y["value"] - max(y["low"], 0))], [100 * (min(y["high"], 1) - y["value"])]]
                    if finite(y["low"]) else None)
            ax.errorbar([x["value"]], [100 * y["value"]], xerr=xerr, yerr=yerr, fmt="o", color=color(arm),
                        capsize=3, label=arm)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 100)
        ax.set_xlabel("MTP acceptance rate as a draft, Σ min(p, q) (last 50 steps)")
        ax.set_ylabel(f"final accuracy (%, mean of last {k} evaluations)")
        ax.set_title(f"{task} (n = {_n_seeds(runs)} seeds; 95% t-intervals, clipped to the range)")
    axes[0, -1].legend(loc="best", ncol=2, fontsize=7)
    fig.suptitle("Draft quality against policy quality per arm", y=1.02)
    fig.tight_layout()
    return fig


def lambda_figure(tasks: dict[str, list[Run]], direction: str = "policy"):
    """The train batch's λ* (``coef_exact``) against the held-out realized optimum λ̂ — two
    different batches (:func:`decomp.results.validate.lambda_star_rows`) — per record (interior λ̂
    only), coloured by arm; the diagonal is agreement."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.4), squeeze=False)
    for ax, (task, runs) in zip(axes[0], tasks.items(), strict=True):
        n = 0
        for arm in regimes_of(runs):
            pts = [(r["hat"], r["star"]) for run in runs if run.regime == arm
                   for r in lambda_star_rows(run, direction)[1]
                   if finite(r["hat"]) and finite(r["star"]) and r["interior"]]
            n += len(pts)
            if pts:
                x, y = np.array(pts).T
                ax.scatter(x, y, s=9, color=color(arm), alpha=0.6, label=arm, edgecolors="none")
        lim = 1e4
        ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.6)
        for setter in (ax.set_xscale, ax.set_yscale):
            setter("symlog", linthresh=1e-2)
        ax.set_xlabel("realized optimum λ̂ (held-out J, symlog)")
        ax.set_ylabel("train batch's quadratic-model optimum λ* (symlog)")
        ax.set_title(f"{task}: {n} records (interior λ̂)")
    axes[0, -1].legend(loc="best", ncol=2, fontsize=7)
    fig.suptitle("λ* against λ̂ (policy direction)", y=1.02)
    fig.tight_layout()
    return fig


def save(fig, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def make_figures(tasks: dict[str, list[Run]], out: Path, k: int) -> list[Path]:
    return [save(accuracy_figure(tasks, k), out, "study_accuracy"), save(training_figure(tasks), out, "study_training"),
            save(terms_figure(tasks), out, "study_terms"), save(estimator_figure(tasks), out, "study_estimators"),
            save(tradeoff_figure(tasks, k), out, "study_tradeoff"), save(lambda_figure(tasks), out, "study_lambda")]
