"""Figures from run directories (``decomp plot``).

One colour per regime throughout (Okabe–Ito, safe for colour-blind readers), one colour and
marker per estimator. Where a regime has several seeds, lines are the mean over seeds at each
step and the band is ± one standard deviation.

Figures (``FIGURES``):

- ``terms_<direction>``: correlation ``C``, cross term ``X``, penalty ``P``, and predicted vs
  realized ``ΔJ_MTP`` over training, per regime, for the ``active``, ``ce`` and ``policy``
  directions;
- ``coefficients``: the exact ``λ*`` of the ``policy`` direction with every estimator, and the
  coefficient an ``occ`` run used;
- ``proxy_vs_exact``: each estimator against ``λ*`` (symlog axes), Spearman and Pearson in the
  legend;
- ``efficiency``: the distribution of ``gain(λ_est)/gain(λ*)`` per estimator;
- ``quadratic_check``: realized ``ΔJ_MTP`` of real counterfactual steps over a grid of ``λ``
  (points) with the quadratic model ``λ(C₁+X₁) − λ²P₁`` (line), at the first and last sweep;
- ``training``: reward, held-out accuracy and MTP acceptance per regime;
- ``curvature``: extreme Hessian eigenvalues of ``J`` over training and the Rayleigh quotient of
  each direction's MTP displacement.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from decomp.analysis.rundata import ESTIMATORS, Run, regimes_of  # noqa: E402

REGIME_COLORS = {
    "detach": "#0072B2",  # blue
    "detach-inputs": "#56B4E9",  # sky blue
    "ce": "#D55E00",  # vermillion
    "policy": "#009E73",  # bluish green
    "occ": "#CC79A7",  # reddish purple
}
ESTIMATOR_STYLE = {
    "reference": ("#E69F00", "o"),  # orange
    "masked": ("#56B4E9", "s"),
    "pooled": ("#009E73", "^"),
    "jvp_masked": ("#D55E00", "v"),
    "jvp_pooled": ("#CC79A7", "D"),
}
DIRECTIONS = ("active", "ce", "policy")
TERM_LABELS = {
    "correlation": "correlation C = ⟨∇J, δ⟩",
    "cross": "cross term X = u_RLᵀHδ",
    "penalty": "penalty P = −½δᵀHδ",
}

plt.rcParams.update({
    "figure.dpi": 110, "savefig.dpi": 130, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
    "legend.fontsize": 8, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
    "axes.spines.right": False,
})


def _color(regime: str) -> str:
    return REGIME_COLORS.get(regime, "#666666")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _by_regime(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        out[r.regime].append(r)
    return out


def _series(runs: list[Run], get: Callable[[Run], list[tuple[int, float]]]):
    """Per step: mean and sd over the runs (seeds) that have a finite value there."""
    values: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for step, v in get(run):
            if _finite(v):
                values[step].append(float(v))
    steps = np.array(sorted(values))
    mean = np.array([np.mean(values[s]) for s in steps])
    sd = np.array([np.std(values[s]) if len(values[s]) > 1 else 0.0 for s in steps])
    return steps, mean, sd, max((len(v) for v in values.values()), default=0)


def _band(ax, steps, mean, sd, color, label, style="-", marker=None, smooth: int = 1) -> None:
    """Mean line (± sd band across seeds). With ``smooth > 1`` the raw means are drawn faint and
    a centred rolling median over ``smooth`` points bold: single updates are noisy and
    heavy-tailed, and a median is not dragged by one outlier."""
    if steps.size == 0:
        return
    if smooth > 1 and steps.size >= smooth:
        ax.plot(steps, mean, style, color=color, lw=0.7, alpha=0.35)
        windows = np.lib.stride_tricks.sliding_window_view(mean, smooth)
        ax.plot(steps[smooth // 2 : steps.size - (smooth - 1) // 2], np.median(windows, axis=1), style,
                color=color, label=label, lw=1.8)
    else:
        ax.plot(steps, mean, style, color=color, label=label, lw=1.4, marker=marker, ms=3)
    if np.any(sd > 0):
        ax.fill_between(steps, mean - sd, mean + sd, color=color, alpha=0.15, lw=0)


def _symlog(ax, axis: str, linthresh: float, values, per_side: int = 3) -> None:
    """A symlog axis with at most ``per_side`` decade ticks on each side of 0 (none inside the
    linear region), so labels never collide."""
    vals = np.abs(np.asarray([v for v in values if np.isfinite(v)], dtype=float))
    top = int(np.ceil(np.log10(max(vals.max(), linthresh * 10)))) if vals.size else 1
    low = int(np.floor(np.log10(linthresh))) + 1
    step = max(1, int(np.ceil((top - low + 1) / per_side)))
    decades = [10.0**k for k in range(top, low - 1, -step)]
    ticks = sorted([-d for d in decades] + [0.0] + decades)
    (ax.set_xscale if axis == "x" else ax.set_yscale)("symlog", linthresh=linthresh)
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks)
    ax.tick_params(axis=axis, which="minor", length=0)


def _legend_note(runs: list[Run]) -> str:
    seeds = _by_regime(runs)
    counts = {len(v) for v in seeds.values()}
    if counts == {1}:
        return "one seed per regime"
    return "mean ± sd over seeds"


def _save(fig, out: Path, name: str, pdf: bool) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png"]
    fig.savefig(paths[0], bbox_inches="tight")
    if pdf:
        paths.append(out / f"{name}.pdf")
        fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _figure_legend(fig, handles, labels, y: float, **kwargs) -> None:
    """A legend above the panels; nothing when there is nothing to label."""
    if labels:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 7), frameon=False,
                   bbox_to_anchor=(0.5, y), **kwargs)


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in these runs", ha="center", va="center", transform=ax.transAxes, color="gray")


def _sci(ax) -> None:
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=True)


def _robust_ylim(ax, values: list[float], q: float = 2.0) -> bool:
    """Limit the y-axis to the [q, 100−q] percentiles of ``values`` (plus margin) when a few
    outliers would otherwise flatten everything; return whether it clipped."""
    vals = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if vals.size < 20:
        return False
    lo, hi = np.percentile(vals, [q, 100 - q])
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    pad = 0.15 * (hi - lo) or 1e-12
    if vals.min() >= lo - pad and vals.max() <= hi + pad:
        return False
    ax.set_ylim(lo - pad, hi + pad)
    return True


SMOOTH = 5  # instrumented updates in the rolling median of the term plots


def plot_terms(runs: list[Run], direction: str):
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), sharex=True)
    groups = _by_regime(runs)
    clipped = False
    for ax, key in zip(axes.flat[:3], ("correlation", "cross", "penalty"), strict=True):
        raw: list[float] = []
        for regime, rs in groups.items():
            steps, mean, sd, _ = _series(rs, lambda run, k=key: [(r["step"], r[k]) for r in run.records(direction)])
            _band(ax, steps, mean, sd, _color(regime), regime, smooth=SMOOTH)
            raw += list(mean)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(TERM_LABELS[key])
        ax.set_ylabel("ΔJ (reward units)")
        _sci(ax)
        clipped |= _robust_ylim(ax, raw)
    ax = axes.flat[3]
    raw = []
    for regime, rs in groups.items():
        steps, mean, sd, _ = _series(rs, lambda run: [(r["step"], r["realized"]) for r in run.records(direction)])
        _band(ax, steps, mean, sd, _color(regime), f"{regime} realized", smooth=SMOOTH)
        raw += list(mean)
        steps, mean, sd, _ = _series(rs, lambda run: [(r["step"], r["predicted"]) for r in run.records(direction)])
        _band(ax, steps, mean, 0 * sd, _color(regime), f"{regime} predicted", style=":", smooth=SMOOTH)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_title("ΔJ_MTP: realized (solid) vs predicted C + X − P (dotted)")
    ax.set_ylabel("ΔJ (reward units)")
    _sci(ax)
    clipped |= _robust_ylim(ax, raw)
    for ax in axes[1]:
        ax.set_xlabel("RL step")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    _figure_legend(fig, handles, labels, 1.0)
    if not any(run.records(direction) for run in runs):
        for ax in axes.flat:
            _no_data(ax, f"{direction}-direction records")
    note = "; y-range: 2–98% quantiles, outliers cut off" if clipped else ""
    fig.suptitle(f"Decomposition of the MTP effect, {direction} direction\n({_legend_note(runs)}; faint: each "
                 f"instrumented update, bold: rolling median of {SMOOTH}{note})", y=1.06)
    fig.tight_layout()
    return fig


def plot_coefficients(runs: list[Run]):
    groups = _by_regime(runs)
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.6, 3.8), sharey=True, squeeze=False)
    every: list[float] = []
    for ax, (regime, rs) in zip(axes[0], groups.items(), strict=True):
        if regime == "occ":
            steps, mean, sd, _ = _series(rs, lambda run: [(m["step"], m.get("mtp_coef")) for m in run.metrics if m["step"] > 0])
            ax.plot(steps, mean, "-", color=_color("occ"), lw=0.8, alpha=0.8, label="λ used by OCC (every step)")
            every += list(mean)
        steps, mean, sd, _ = _series(rs, lambda run: [(r["step"], r["lambda_star"]) for r in run.records("policy")])
        _band(ax, steps, mean, sd, "black", "exact λ*", marker="o")
        every += list(mean)
        for est, (color, marker) in ESTIMATOR_STYLE.items():
            steps, mean, sd, _ = _series(rs, lambda run, e=est: [(r["step"], r[f"coef_{e}"]) for r in run.records("policy")])
            ax.plot(steps, mean, marker, color=color, ms=3.5, alpha=0.85, ls="none", label=est)
            every += list(mean)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"{regime} run")
        ax.set_xlabel("RL step")
    for ax in axes[0]:
        _symlog(ax, "y", 1e-3, every)
    axes[0, 0].set_ylabel("coefficient λ (symlog)")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    _figure_legend(fig, handles, labels, 1.08)
    fig.suptitle("Optimal coefficient λ* of the policy MTP loss and its estimates", y=1.14)
    fig.tight_layout()
    return fig


def _estimator_points(runs: list[Run], est: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    xs, ys, regs = [], [], []
    for run in runs:
        for r in run.records("policy"):
            if _finite(r.get("lambda_star")) and _finite(r.get(f"coef_{est}")):
                xs.append(r["lambda_star"])
                ys.append(r[f"coef_{est}"])
                regs.append(run.regime)
    return np.array(xs), np.array(ys), regs


def plot_proxy_vs_exact(runs: list[Run]):
    fig, axes = plt.subplots(1, len(ESTIMATORS), figsize=(3.3 * len(ESTIMATORS), 3.7), squeeze=False)
    for ax, est in zip(axes[0], ESTIMATORS, strict=True):
        x, y, regs = _estimator_points(runs, est)
        for regime in regimes_of(runs):
            sel = np.array([g == regime for g in regs], dtype=bool)
            if sel.any():
                ax.scatter(x[sel], y[sel], s=12, color=_color(regime), alpha=0.75, label=regime, edgecolors="none")
        title = est
        if x.size >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
            rho = stats.spearmanr(x, y).statistic
            r = stats.pearsonr(x, y).statistic
            title = f"{est}\nSpearman {rho:+.2f}, Pearson {r:+.2f}, n = {x.size}"
        lin_y = float(np.percentile(np.abs(y[y != 0]), 10)) if np.any(y != 0) else 1e-4
        _symlog(ax, "x", 1e-1, x, per_side=2)
        _symlog(ax, "y", lin_y, y)
        ax.axhline(0, color="black", lw=0.5)
        ax.axvline(0, color="black", lw=0.5)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("exact λ* (symlog)")
    axes[0, 0].set_ylabel("estimate (symlog)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    _figure_legend(fig, handles, labels, 1.02, title="run regime (points: instrumented updates)", title_fontsize=8)
    fig.suptitle("Estimators against the exact optimal coefficient (policy direction)", y=1.12)
    fig.tight_layout()
    return fig


def plot_efficiency(runs: list[Run]):
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    data, labels = [], []
    for est in ESTIMATORS:
        vals = [r[f"efficiency_{est}"] for run in runs for r in run.records("policy") if _finite(r.get(f"efficiency_{est}"))]
        data.append(np.array(vals))
        labels.append(f"{est}\n(n={len(vals)})")
    positions = np.arange(len(data))
    for i, (vals, est) in enumerate(zip(data, ESTIMATORS, strict=True)):
        if vals.size:
            jitter = np.random.default_rng(i).uniform(-0.18, 0.18, vals.size)
            ax.scatter(positions[i] + jitter, vals, s=9, alpha=0.5, color=ESTIMATOR_STYLE[est][0], edgecolors="none")
            ax.plot([positions[i] - 0.3, positions[i] + 0.3], [np.median(vals)] * 2, color="black", lw=2)
    ax.axhline(1, color="#009E73", lw=1, ls="--", label="1: as good as λ*")
    ax.axhline(0, color="black", lw=0.8, label="0: no gain (≤ 0 hurts)")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xticks(positions, labels)
    ax.set_ylabel("efficiency gain(λ_est)/gain(λ*) (symlog)")
    ax.set_title("Efficiency of each estimator (policy direction; bar = median)")
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    return fig


def plot_quadratic_check(runs: list[Run]):
    picks = []
    for run in runs:
        pol = [s for s in run.sweeps if s["direction"] == "policy"]
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
        ax.plot(dense, a * dense * dense + b * dense, color=_color(run.regime), lw=1.5, label="quadratic model")
        ax.scatter(lam, real, s=16, color="black", zorder=3, label="real AdamW step")
        if _finite(sw.get("lambda_star")):
            ax.axvline(sw["lambda_star"], color="gray", ls="--", lw=0.8, label="λ*")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"{run.regime} s{run.seed}, step {sw['step']}")
        ax.set_xlabel("coefficient λ")
        ax.set_ylabel("ΔJ_MTP")
        _sci(ax)
    for ax in list(axes.flat)[len(picks):]:
        ax.set_axis_off()
    axes.flat[0].legend(loc="best", fontsize=7)
    fig.suptitle("Quadratic model vs real counterfactual steps (policy direction)", y=1.02)
    fig.tight_layout()
    return fig


def plot_training(runs: list[Run]):
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    groups = _by_regime(runs)
    specs = [("reward_mean", "mean reward (rollouts, 10-step mean)", 10), ("accuracy", "held-out greedy accuracy", 1),
             ("mtp_acceptance", "MTP acceptance (10-step mean)", 10)]
    for ax, (key, title, window) in zip(axes, specs, strict=True):
        for regime, rs in groups.items():
            def get(run, k=key, w=window):
                pts = [(m["step"], m.get(k)) for m in run.metrics if _finite(m.get(k))]
                if w > 1 and len(pts) >= w:
                    steps = [p[0] for p in pts]
                    vals = np.convolve([p[1] for p in pts], np.ones(w) / w, mode="valid")
                    return list(zip(steps[w - 1 :], vals, strict=True))
                return pts

            steps, mean, sd, _ = _series(rs, get)
            _band(ax, steps, mean, sd, _color(regime), regime)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.set_ylabel("fraction")
    axes[0].legend(loc="best")
    fig.suptitle(f"Training ({_legend_note(runs)})", y=1.02)
    fig.tight_layout()
    return fig


def plot_curvature(runs: list[Run]):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    groups = _by_regime(runs)
    for regime, rs in groups.items():
        for key, style in (("eigenvalue_max", "-"), ("eigenvalue_min", "--")):
            steps, mean, sd, _ = _series(rs, lambda run, k=key: [(c["step"], c[k]) for c in run.curvature])
            _band(axes[0], steps, mean, sd, _color(regime), regime if key.endswith("max") else None, style=style,
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
                for r in run.records(d):
                    n = r.get("displacement_norm")
                    if _finite(n) and n > 0:
                        pts.append((r["step"], -2.0 * r["penalty"] / (n * n)))
                return pts

            steps, mean, sd, _ = _series(rs, rq)
            _band(ax, steps, mean, sd, _color(regime), None, marker="o")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(f"Rayleigh quotient δᵀHδ/δᵀδ\nof the {direction} MTP displacement")
        ax.set_xlabel("RL step")
        ax.set_ylabel("curvature of J along δ (symlog)")
    handles, labels = axes[0].get_legend_handles_labels()
    _figure_legend(fig, handles, labels, 1.02, title="run regime", title_fontsize=8)
    if not any(run.curvature for run in runs):
        _no_data(axes[0], "eigenvalue records")
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
        written += _save(fn(runs), Path(out), name, pdf)
    return written
