"""The shared look of decomp's figures: one colour per regime (Okabe–Ito, safe for colour-blind
readers), one colour and marker per estimator (its rule's ``style``), seed-mean lines with ±sd
bands, symlog axes, legends and saving. Used by :mod:`decomp.results.plots`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from decomp.results.rundata import Run
from decomp.results.stats import finite
from decomp.results.validate import select_records
from decomp.rules import RULES

REGIME_COLORS = {
    "detach": "#0072B2",  # blue
    "detach-inputs": "#56B4E9",  # sky blue
    "ce": "#D55E00",  # vermillion
    "policy": "#009E73",  # bluish green
    "occ": "#CC79A7",  # reddish purple
    "occ-tr": "#E69F00",  # orange
    "occ-split": "#999933",  # olive (Tol's muted palette)
    "oracle": "#000000",  # black
    "cosine": "#F0E442",  # yellow
    "frozen": "#999999",  # grey
    "distill": "#882255",  # wine
}
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


def regime_color(regime: str) -> str:
    return REGIME_COLORS.get(regime, "#666666")


def by_regime(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        out[r.regime].append(r)
    return out


def estimator_style(estimator: str, i: int = 0) -> tuple[str, str]:
    """The estimator rule's ``(color, marker)`` (:mod:`decomp.rules`), else a grey of the palette."""
    rule = RULES.get(estimator)
    if rule is not None and rule.style is not None:
        return rule.style
    return (("#666666", "#999999", "#000000")[i % 3], "PXh*p"[i % 5])


def direction_records(run: Run, direction: str) -> list[dict[str, Any]]:
    """The run's records of ``direction`` on its preferred split (held-out when it has one)."""
    return select_records(run, direction)[1]


def series(runs: list[Run], get: Callable[[Run], list[tuple[int, float]]]):
    """Per step: mean and sd over the runs (seeds) that have a finite value there; a run's
    several values at one step (several updates) are averaged first, so each run counts once."""
    values: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        per_step: dict[int, list[float]] = defaultdict(list)
        for step, v in get(run):
            if finite(v):
                per_step[step].append(float(v))
        for step, vs in per_step.items():
            values[step].append(float(np.mean(vs)))
    steps = np.array(sorted(values))
    mean = np.array([np.mean(values[s]) for s in steps])
    sd = np.array([np.std(values[s]) if len(values[s]) > 1 else 0.0 for s in steps])
    return steps, mean, sd, max((len(v) for v in values.values()), default=0)


def band(ax, steps, mean, sd, color, label, style="-", marker=None, smooth: int = 1) -> None:
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


def symlog(ax, axis: str, linthresh: float, values, per_side: int = 3) -> None:
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


def legend_note(runs: list[Run]) -> str:
    seeds = by_regime(runs)
    counts = {len(v) for v in seeds.values()}
    if counts == {1}:
        return "one seed per regime"
    return "mean ± sd over seeds"


def save_figure(fig, out: Path, name: str, pdf: bool) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png"]
    fig.savefig(paths[0], bbox_inches="tight")
    if pdf:
        paths.append(out / f"{name}.pdf")
        fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def figure_legend(fig, handles, labels, y: float, **kwargs) -> None:
    """A legend above the panels; nothing when there is nothing to label."""
    if labels:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 7), frameon=False,
                   bbox_to_anchor=(0.5, y), **kwargs)


def no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in these runs", ha="center", va="center", transform=ax.transAxes, color="gray")


def sci_axis(ax) -> None:
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=True)


def robust_ylim(ax, values: list[float], q: float = 2.0) -> bool:
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
