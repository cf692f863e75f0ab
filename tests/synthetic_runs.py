"""Synthetic run directories with known values, for the analysis tests.

Each run has ``n`` instrumented steps, three directions per step (``active``, ``ce``,
``policy``), sweeps and curvature. As :func:`decomp.instrument.instrument_update` does, the
shadow direction identical to the active one (``ce`` of a ``ce`` run, ``policy`` of a ``policy``
run) is a copy of the active record with ``seconds: 0.0`` (and ``same_as: "active"`` with
``new_fields``). With ``new_fields`` (the default) records carry the realized optimum: the
realized ``ΔJ(λ) = λ(C₁+X₁)(1+e₁) − λ²P₁(1+e₂)`` (``e₁``, ``e₂`` small noise) gives ``lambda_hat``,
``gain_hat``, ``gain_lambda_star``, ``gain_<E>``, the realized ``efficiency_<E>`` and the
quadratic model's ``model_efficiency_<E>``; without, the older schema (``efficiency_<E>`` is the
model's). ``heldout`` adds a ``split: "heldout"`` record beside every ``train`` one; ``heldout2``
(with ``heldout``) a ``split: "heldout2"`` record too, a second held-out batch of the same update
carrying ``lambda_hat_other`` (the ``heldout`` record's ``λ̂``) and ``gain_lambda_hat_other`` (its
realized gain on this batch). ``exact`` adds the ``exact`` estimator (the train batch's ``λ*``,
``coef_exact``, with its ``gain_exact``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from decomp.runlog import SCHEMA_VERSION, dumps

NAN = float("nan")


def _model_gain(v: float, c1x1: float, p1: float) -> float:
    return v * c1x1 - v * v * p1


def _realized_fields(c1x1: float, p1: float, lam: float, estimates: dict[str, float], e1: float,
                     e2: float, other_hat: float | None = None) -> dict:
    """The new schema's realized-optimum fields for one record (with ``other_hat``: the ``λ̂`` of
    another batch and its realized gain on this one)."""
    def realized(v: float) -> float:
        return v * c1x1 * (1 + e1) - v * v * p1 * (1 + e2)

    hat = c1x1 * (1 + e1) / (2 * p1 * (1 + e2)) if p1 > 0 else NAN
    best = realized(hat) if p1 > 0 else NAN
    rec = {"lambda_hat": hat, "gain_hat": best, "lambda_hat_reason": "" if p1 > 0 else "no maximum",
           "gain_lambda_star": realized(lam) if p1 > 0 else NAN}
    if other_hat is not None:
        rec |= {"lambda_hat_other": other_hat, "gain_lambda_hat_other": realized(other_hat)}
    for name, value in estimates.items():
        rec[f"gain_{name}"] = realized(value)
        rec[f"efficiency_{name}"] = realized(value) / best if p1 > 0 and best != 0 else NAN
        model_best = _model_gain(lam, c1x1, p1)
        rec[f"model_efficiency_{name}"] = _model_gain(value, c1x1, p1) / model_best if p1 > 0 and model_best else NAN
    return rec


def _decomposition(step: int, direction: str, c1: float, x1: float, p1: float, coef: float,
                   estimates: dict[str, float], cosine: float, realized_noise: float = 0.0) -> dict:
    c, x, p = coef * c1, coef * x1, coef * coef * p1
    predicted = c + x - p
    lam = (c1 + x1) / (2 * p1) if p1 > 0 else NAN
    rec = {
        "step": step, "update": 1, "direction": direction, "correlation": c, "cross": x, "penalty": p,
        "predicted": predicted, "realized": predicted * (1 + realized_noise), "residual": predicted * realized_noise,
        "lambda_star": lam, "lambda_star_no_cross": c1 / (2 * p1) if p1 > 0 else NAN,
        "lambda_star_reason": "" if p1 > 0 else "penalty_unit <= 0",
        "correlation_unit": c1, "cross_unit": x1, "penalty_unit": p1, "cosine": cosine,
        "displacement_norm": abs(coef) * 0.01 + 1e-3, "coef": coef, "optimizer": "adamw",
    }
    for name, value in estimates.items():
        rec[f"coef_{name}"] = value
        model_best = _model_gain(lam, c1 + x1, p1)
        rec[f"efficiency_{name}"] = _model_gain(value, c1 + x1, p1) / model_best if p1 > 0 and model_best else NAN
    rec["seconds"] = 0.25
    return rec


def _metrics(regime: str, n: int, warm: float, final: float) -> list[dict]:
    """Step 0 (warm start) and every step; held-out accuracy every 10 steps and at the end,
    rising linearly from ``warm`` to ``final``."""
    metrics = [{"step": 0, "regime": regime, "accuracy": warm}]
    for i in range(1, n + 1):
        m = {"step": i, "regime": regime, "reward_mean": 0.3 + 0.01 * i, "mtp_acceptance": 0.6, "mtp_coef": 0.1,
             "pg_loss": 0.0, "mtp_loss": 1.0, "seconds": 0.1}
        if i % 10 == 0 or i == n:
            m["accuracy"] = warm + (final - warm) * i / n
        metrics.append(m)
    return metrics


def _step_records(regime: str, i: int, split: str, rng: np.random.Generator, *, c1, p1, cosine, estimate,
                  new_fields: bool, copies: bool, exact: bool = False,
                  others: dict[str, float] | None = None) -> list[dict]:
    """The three directions' records of step ``i`` on ``split`` (``others``: per direction, the
    ``λ̂`` of the other held-out batch, for a ``heldout2`` record)."""
    out: list[dict] = []
    for d in ("active", "ce", "policy"):
        if copies and d == regime and out:
            copy = {**out[0], "direction": d, "seconds": 0.0}
            out.append(copy | ({"same_as": "active"} if new_fields else {}))
            continue
        a, b = c1(i, d), p1(i, d)
        if regime == "detach" and d == "active":
            a, b = 0.0, 0.0
        lam = a / (2 * b) if b > 0 else NAN
        est = estimate(lam, i) if estimate is not None else lam * 0.01 * (1 + 0.3 * rng.standard_normal())
        ests = {"reference": est, "masked": est * 2, "pooled": est * 0.5,
                "jvp_masked": est + 0.1 * rng.standard_normal(), "jvp_pooled": -est}
        if exact:
            ests["exact"] = lam  # the train batch's λ*: the same update's on every split
        rec = {"regime": regime, **_decomposition(i, d, a, 0.0, b, 0.1, ests, cosine(i, d),
                                                  0.01 * rng.standard_normal())}
        if new_fields:
            rec |= {"split": split, "same_as": ""}
            rec |= _realized_fields(a, b, lam, ests, 0.05 * rng.standard_normal(), 0.05 * rng.standard_normal(),
                                    None if others is None else others.get(d, NAN))
        elif split != "train":
            rec["split"] = split
        out.append(rec)
    return out


def _sweep_and_curvature(regime: str, i: int, c1, p1) -> tuple[dict, dict]:
    lam = c1(i, "policy") / (2 * p1(i, "policy"))
    grid = list(lam * np.linspace(-0.5, 2.5, 13))
    quad = [g * c1(i, "policy") - g * g * p1(i, "policy") for g in grid]
    sweep = {"step": i, "update": 1, "regime": regime, "direction": "policy", "lambda_star": lam,
             "coefs": grid, "realized": [q * 1.05 for q in quad], "quadratic": quad}
    curv = {"step": i, "update": 1, "regime": regime, "eigenvalue_max": 30.0 + i, "eigenvalue_min": -300.0 - i}
    return sweep, curv


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
    new_fields: bool = True,
    heldout: bool = False,
    copies: bool = True,
    heldout2: bool = False,
    exact: bool = False,
) -> Path:
    """A run of ``n`` instrumented steps (every step), three directions, sweeps and curvature
    (module docstring)."""
    rng = np.random.default_rng(rng_seed + 101 * seed)
    out = Path(root) / f"{regime}-seed{seed}"
    out.mkdir(parents=True)
    version = SCHEMA_VERSION if new_fields else 1
    (out / "config.json").write_text(json.dumps({"config": {"regime": regime, "seed": seed, "steps": n},
                                                 "schema_version": version}))
    decomps, sweeps, curv = [], [], []
    for i in range(1, n + 1):
        for split in ("train", "heldout") if heldout else ("train",):
            decomps += _step_records(regime, i, split, rng, c1=c1, p1=p1, cosine=cosine, estimate=estimate,
                                     new_fields=new_fields, copies=copies, exact=exact)
        if heldout and heldout2:
            others = {r["direction"]: r.get("lambda_hat", NAN) for r in decomps[-3:]}
            decomps += _step_records(regime, i, "heldout2", rng, c1=c1, p1=p1, cosine=cosine, estimate=estimate,
                                     new_fields=new_fields, copies=copies, exact=exact, others=others)
        if i % 10 == 0:
            sweep, eig = _sweep_and_curvature(regime, i, c1, p1)
            sweeps.append(sweep)
            curv.append(eig)
    for name, rows in (("metrics.jsonl", _metrics(regime, n, warm, final)), ("decomposition.jsonl", decomps),
                       ("sweeps.jsonl", sweeps), ("curvature.jsonl", curv)):
        with open(out / name, "w") as f:
            f.writelines(dumps(r) + "\n" for r in rows)
    return out


def edit_records(run_dir: Path, edit: Callable[[dict], dict | None]) -> None:
    """Rewrite a run's ``decomposition.jsonl`` through ``edit`` (``None`` drops the record)."""
    path = Path(run_dir) / "decomposition.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r2 for r in rows if (r2 := edit(r)) is not None]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
