"""Synthetic run directories with known values, for the analysis tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from decomp.runlog import dumps


def _decomposition(step: int, direction: str, c1: float, x1: float, p1: float, coef: float,
                   estimates: dict[str, float], cosine: float, realized_noise: float = 0.0) -> dict:
    c, x, p = coef * c1, coef * x1, coef * coef * p1
    predicted = c + x - p
    lam = (c1 + x1) / (2 * p1) if p1 > 0 else float("nan")
    rec = {
        "step": step, "update": 1, "direction": direction, "correlation": c, "cross": x, "penalty": p,
        "predicted": predicted, "realized": predicted * (1 + realized_noise), "residual": predicted * realized_noise,
        "lambda_star": lam, "lambda_star_no_cross": c1 / (2 * p1) if p1 > 0 else float("nan"),
        "lambda_star_reason": "" if p1 > 0 else "penalty_unit <= 0",
        "correlation_unit": c1, "cross_unit": x1, "penalty_unit": p1, "cosine": cosine,
        "displacement_norm": abs(coef) * 0.01 + 1e-3, "coef": coef, "optimizer": "adamw",
    }
    for name, value in estimates.items():
        rec[f"coef_{name}"] = value
        gain = lambda v: v * (c1 + x1) - v * v * p1  # noqa: E731
        rec[f"efficiency_{name}"] = gain(value) / gain(lam) if p1 > 0 and gain(lam) != 0 else float("nan")
    return rec


def write_run(
    root: Path,
    regime: str,
    seed: int,
    *,
    n: int = 30,
    warm: float = 0.4,
    final: float = 0.6,
    c1: Callable[[int, str], float] = lambda i, d: 1e-3,
    p1: Callable[[int, str], float] = lambda i, d: 1e-4,
    cosine: Callable[[int, str], float] = lambda i, d: 0.05,
    estimate: Callable[[float, int], float] | None = None,
    rng_seed: int = 0,
) -> Path:
    """A run of ``n`` instrumented steps (every step), three directions, sweeps and curvature."""
    rng = np.random.default_rng(rng_seed + 101 * seed)
    out = Path(root) / f"{regime}-seed{seed}"
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"config": {"regime": regime, "seed": seed, "steps": n}, "schema_version": 1}))
    metrics = [{"step": 0, "regime": regime, "accuracy": warm}]
    for i in range(1, n + 1):
        m = {"step": i, "regime": regime, "reward_mean": 0.3 + 0.01 * i, "mtp_acceptance": 0.6, "mtp_coef": 0.1,
             "pg_loss": 0.0, "mtp_loss": 1.0, "seconds": 0.1}
        if i % 10 == 0 or i == n:
            m["accuracy"] = warm + (final - warm) * i / n
        metrics.append(m)
    decomps, sweeps, curv = [], [], []
    for i in range(1, n + 1):
        for d in ("active", "ce", "policy"):
            a, b = c1(i, d), p1(i, d)
            if regime == "detach" and d == "active":
                a, b = 0.0, 0.0
            lam = a / (2 * b) if b > 0 else float("nan")
            est = estimate(lam, i) if estimate is not None else lam * 0.01 * (1 + 0.3 * rng.standard_normal())
            ests = {"reference": est, "masked": est * 2, "pooled": est * 0.5,
                    "jvp_masked": est + 0.1 * rng.standard_normal(), "jvp_pooled": -est}
            decomps.append({"regime": regime, **_decomposition(i, d, a, 0.0, b, 0.1, ests, cosine(i, d),
                                                               0.01 * rng.standard_normal())})
        if i % 10 == 0:
            lam = c1(i, "policy") / (2 * p1(i, "policy"))
            grid = list(lam * np.linspace(-0.5, 2.5, 13))
            quad = [g * c1(i, "policy") - g * g * p1(i, "policy") for g in grid]
            sweeps.append({"step": i, "update": 1, "regime": regime, "direction": "policy", "lambda_star": lam,
                           "coefs": grid, "realized": [q * 1.05 for q in quad], "quadratic": quad})
            curv.append({"step": i, "update": 1, "regime": regime, "eigenvalue_max": 30.0 + i, "eigenvalue_min": -300.0 - i})
    for name, rows in (("metrics.jsonl", metrics), ("decomposition.jsonl", decomps), ("sweeps.jsonl", sweeps),
                       ("curvature.jsonl", curv)):
        with open(out / name, "w") as f:
            for r in rows:
                f.write(dumps(r) + "\n")
    return out
