"""Instrumentation of one real training update: exact decompositions and every OCC estimator.

Called by the training loop just before an optimizer step, with the live model, the live
optimizer and the mini-batch of that step. For each MTP *direction* —

- ``active``: the run's own regime and coefficient (for ``occ``, this step's estimate ``λ_t``);
- ``ce`` and ``policy``: shadow directions with the fixed coefficient ``c`` (``scale``), measured in every
  run (a ``detach`` run included) to see what joint training would do at this point —

it records every field of :class:`~decomp.decomposition.Decomposition` (with the live AdamW
state, and the RL update following the gradient of the training loss's RL part — the clipped
surrogate plus the KL term — as the real update does), the proxy estimators (``reference``,
``masked``, ``pooled`` on the response-shaped view, averaged over MTP depths as training
averages the depths' coefficients; they depend only on the log-probs, so they are the same for
every direction), the ``jvp`` estimators
(``jvp_masked``, ``jvp_pooled``, along that direction's ``δ₁`` and ``u_RL``) and each
estimator's efficiency against that direction's ``λ*``.

Optionally, at the same update:

- a coefficient **sweep** per measured direction (:func:`~decomp.decomposition.sweep_coefficients`):
  the realized ``ΔJ_MTP`` of real counterfactual AdamW steps on a grid of ``λ`` around that
  direction's ``λ*`` (``λ*·[−0.5, 2.5]``, or ``c·[−20, 20]`` when ``λ*`` is undefined), beside
  the quadratic model;
- the **curvature** context: the largest and smallest eigenvalues of ``∇²J`` on the mini-batch
  (one Lanczos run, both ends). The Rayleigh quotient of each direction's displacement needs no
  extra work: it is ``−2·penalty / displacement_norm²`` from the decomposition record.

Nothing here changes the parameters, ``.grad``, the optimizer state or the RNG streams.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from decomp.config import DIRECTIONS
from decomp.curvature import jvp_logprobs, top_eigenvalues
from decomp.decomposition import StepMeasurement, measure_step, sweep_coefficients
from decomp.objectives import Objectives, RolloutBatch, model_logprobs, objectives
from decomp.occ import efficiency, projection_coefficient, proxy_coefficients
from decomp.regimes import CrossEntropy, Policy, Regime

SWEEP_POINTS = 13
EIGEN_TOL = 1e-3  # relative accuracy of the Ritz values: enough to place δ in the spectrum


def shadow_regimes(regime: Regime, scale: float, clip: tuple[float, float] = (0.2, 0.2)) -> dict[str, Regime]:
    """The regimes whose MTP loss defines each direction (see module docstring); the shadow
    ``policy`` direction takes the active regime's form and clip range, else ``clip``."""
    form = getattr(regime, "form", "ratio")
    clips = {"clip_low": getattr(regime, "clip_low", clip[0]), "clip_high": getattr(regime, "clip_high", clip[1])}
    return {
        "active": regime,
        "ce": CrossEntropy(scale=scale),
        "policy": Policy(scale=scale, form=form, **clips),
    }


def _same_direction(a: Regime, b: Regime, coef_a: float, coef_b: float) -> bool:
    # e.g. the shadow `ce` direction of a `ce` run is the active direction itself
    return type(a) is type(b) and a == b and coef_a == coef_b


def sweep_grid(lambda_star: float, scale: float, points: int = SWEEP_POINTS) -> list[float]:
    """``λ*·linspace(−0.5, 2.5)`` (the parabola's roots 0 and 2λ* and its peak inside), or
    ``c·linspace(−20, 20)`` when ``λ*`` is undefined or zero."""
    if math.isfinite(lambda_star) and lambda_star != 0.0:
        return [float(x) for x in lambda_star * np.linspace(-0.5, 2.5, points)]
    return [float(x) for x in scale * np.linspace(-20.0, 20.0, points)]


@dataclass
class Instrumented:
    """What one instrumented update produced (records for each JSONL file)."""

    decompositions: list[dict[str, Any]]
    sweeps: list[dict[str, Any]] = field(default_factory=list)
    curvature: dict[str, Any] | None = None


def proxy_estimates(model: nn.Module, batch: RolloutBatch, scale: float) -> dict[str, float]:
    """Every proxy estimator of this update, each the mean over MTP depths of its value on
    that depth's log-probs (training applies the mean of the depths' coefficients)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        logp, mtp_logps, valids = model_logprobs(model, params, batch.tokens, attention_mask=batch.attention_mask)
    view, mask = batch.response, batch.mask.bool()
    per_depth = [proxy_coefficients(view(m), view(logp), view(batch.old_logp), view(mask & v), scale)
                 for m, v in zip(mtp_logps, valids, strict=True)]
    return {name: sum(d[name] for d in per_depth) / len(per_depth) for name in per_depth[0]}


def jvp_estimates(obj: Objectives, params: dict, measured: StepMeasurement, batch: RolloutBatch,
                  scale: float) -> dict[str, float]:
    """The jvp level: ``a = ∇ℓ·δ₁``, ``b = ∇ℓ·u_RL`` by forward mode, once, for both reductions."""
    updates, view = measured.updates, batch.response
    a = view(jvp_logprobs(obj.logprob_fn, params, updates.unit_displacement))
    b = view(jvp_logprobs(obj.logprob_fn, params, updates.update_rl))
    mask = view(batch.mask.bool())
    return {f"jvp_{r}": float(projection_coefficient(a, b, mask, scale, r)) for r in ("masked", "pooled")}


def _objectives(model: nn.Module, batch: RolloutBatch, regime: Regime, coef: float, loss: dict[str, Any]) -> Objectives:
    if loss.get("rl_loss_of_logp") is None:
        return objectives(model, batch, regime, coef=coef, clip=loss["clip"], kl_coef=loss["kl_coef"],
                          ref_logp=loss["ref_logp"])
    return objectives(model, batch, regime, coef=coef, rl_loss_of_logp=loss["rl_loss_of_logp"])


def measure_direction(
    model: nn.Module, batch: RolloutBatch, optimizer: torch.optim.Optimizer, regime: Regime, coef: float,
    proxies: dict[str, float], scale: float, loss: dict[str, Any],
) -> tuple[dict[str, Any], StepMeasurement, Objectives]:
    """The decomposition record of one direction: every field, every estimate and its efficiency."""
    start = time.perf_counter()
    named = dict(model.named_parameters())
    params = {k: v.detach() for k, v in named.items()}
    obj = _objectives(model, batch, regime, coef, loss)
    measured = measure_step(obj.rl_objective, obj.mtp_loss, named, coef=coef, optimizer=optimizer, rl_loss=obj.rl_loss)
    dec = measured.decomposition
    estimates = {**proxies, **jvp_estimates(obj, params, measured, batch, scale)}
    record: dict[str, Any] = {"regime_of_direction": regime.name, **dec.to_dict()}
    for name, lam in estimates.items():
        record[f"coef_{name}"] = lam
        record[f"efficiency_{name}"] = efficiency(lam, dec)
    record["seconds"] = time.perf_counter() - start
    return record, measured, obj


def sweep_record(measured: StepMeasurement, obj: Objectives, model: nn.Module, regime: Regime, scale: float,
                 coef: float) -> dict[str, Any]:
    """Realized ``ΔJ_MTP`` of real counterfactual steps on :func:`sweep_grid` around ``λ*``."""
    dec = measured.decomposition
    grid = sweep_grid(dec.lambda_star, scale)
    result = sweep_coefficients(measured, obj.rl_objective, dict(model.named_parameters()), grid)
    return {"regime_of_direction": regime.name, "lambda_star": dec.lambda_star, "coef": coef,
            "coefs": result.coefs, "realized": result.realized, "quadratic": result.quadratic}


def curvature_record(model: nn.Module, batch: RolloutBatch, regime: Regime) -> dict[str, Any]:
    """The largest and smallest eigenvalues of ``∇²J`` on the mini-batch (one Lanczos run)."""
    start = time.perf_counter()
    params = {k: v.detach() for k, v in model.named_parameters()}
    top, bottom = top_eigenvalues(objectives(model, batch, regime).rl_objective, params, k=2, which="BE", tol=EIGEN_TOL)
    return {"eigenvalue_max": float(top), "eigenvalue_min": float(bottom), "seconds": time.perf_counter() - start}


def instrument_update(
    model: nn.Module,
    batch: RolloutBatch,
    optimizer: torch.optim.Optimizer,
    regime: Regime,
    *,
    scale: float,
    coef: float,
    clip: tuple[float, float] = (0.2, 0.2),
    kl_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    directions: tuple[str, ...] = DIRECTIONS,
    sweep: bool = False,
    curvature: bool = False,
    rl_loss_of_logp: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Instrumented:
    """One decomposition record per direction (``active``, ``ce``, ``policy``) for the coming
    update; with ``sweep``/``curvature``, the sweeps and eigenvalues too (module docstring).

    ``scale`` is the run's ``c`` (the shadow directions' ``λ``); ``coef`` is the ``λ`` the run
    applies at this update (``c``, or the OCC estimate); ``clip``, ``kl_coef`` and ``ref_logp``
    define the training loss's RL part, or ``rl_loss_of_logp`` replaces it (a trainer's own loss
    as a function of the aligned main log-probs, see :func:`decomp.objectives.objectives`).
    """
    proxies = proxy_estimates(model, batch, scale)
    loss = {"clip": clip, "kl_coef": kl_coef, "ref_logp": ref_logp, "rl_loss_of_logp": rl_loss_of_logp}
    out = Instrumented([])
    coefs = {"active": coef, "ce": scale, "policy": scale}
    for direction, reg in shadow_regimes(regime, scale, clip).items():
        if direction not in directions:
            continue
        first = out.decompositions[0] if out.decompositions else None
        if first is not None and first["direction"] == "active" and _same_direction(reg, regime, coefs[direction], coef):
            out.decompositions.append({**first, "direction": direction, "seconds": 0.0})
            continue
        record, measured, obj = measure_direction(model, batch, optimizer, reg, coefs[direction], proxies, scale, loss)
        out.decompositions.append({"direction": direction, **record})
        if sweep and measured.decomposition.moves_objective:
            out.sweeps.append({"direction": direction, **sweep_record(measured, obj, model, reg, scale, coefs[direction])})
    if curvature:
        out.curvature = curvature_record(model, batch, regime)
    return out
