"""Instrumentation of one real training update: exact decompositions and every OCC estimator.

Called by the training loop just before an optimizer step, with the live model, the live
optimizer and the mini-batch of that step. For each MTP *direction* —

- ``active``: the run's own regime and coefficient (for ``occ``, this step's estimate ``λ_t``);
- ``ce`` and ``policy``: shadow directions with the fixed coefficient ``c``, measured in every
  run (a ``detach`` run included) to see what joint training would do at this point —

it records every field of :class:`~decomp.decomposition.Decomposition` (with the live AdamW
state, and the RL update following the gradient of the training loss's RL part — the clipped
surrogate plus the KL term — as the real update does), the proxy estimators (``reference``,
``masked``, ``pooled`` on the response-shaped view; they depend only on the log-probs, so they
are the same for every direction), the ``jvp`` estimators
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

from decomp.curvature import jvp_logprobs, top_eigenvalues
from decomp.decomposition import measure_step, sweep_coefficients
from decomp.objectives import RolloutBatch, model_logprobs, objectives
from decomp.occ import efficiency, projection_coefficient, proxy_coefficients
from decomp.regimes import CrossEntropy, Policy, Regime

DIRECTIONS = ("active", "ce", "policy")


def shadow_regimes(regime: Regime, coef: float, clip: tuple[float, float] = (0.2, 0.2)) -> dict[str, Regime]:
    """The regimes whose MTP loss defines each direction (see module docstring); the shadow
    ``policy`` direction takes the active regime's form and clip range, else ``clip``."""
    form = getattr(regime, "form", "ratio")
    clips = {"clip_low": getattr(regime, "clip_low", clip[0]), "clip_high": getattr(regime, "clip_high", clip[1])}
    return {
        "active": regime,
        "ce": CrossEntropy(coef=coef),
        "policy": Policy(coef=coef, form=form, **clips),
    }


def _same_direction(a: Regime, b: Regime, coef_a: float, coef_b: float) -> bool:
    # e.g. the shadow `ce` direction of a `ce` run is the active direction itself
    return type(a) is type(b) and a == b and coef_a == coef_b


SWEEP_POINTS = 13
EIGEN_TOL = 1e-3  # relative accuracy of the Ritz values: enough to place δ in the spectrum


def sweep_grid(lambda_star: float, coef: float, points: int = SWEEP_POINTS) -> list[float]:
    """``λ*·linspace(−0.5, 2.5)`` (the parabola's roots 0 and 2λ* and its peak inside), or
    ``c·linspace(−20, 20)`` when ``λ*`` is undefined or zero."""
    if math.isfinite(lambda_star) and lambda_star != 0.0:
        return [float(x) for x in lambda_star * np.linspace(-0.5, 2.5, points)]
    return [float(x) for x in coef * np.linspace(-20.0, 20.0, points)]


@dataclass
class Instrumented:
    """What one instrumented update produced (records for each JSONL file)."""

    decompositions: list[dict[str, Any]]
    sweeps: list[dict[str, Any]] = field(default_factory=list)
    curvature: dict[str, Any] | None = None


def instrument_update(
    model: nn.Module,
    batch: RolloutBatch,
    optimizer: torch.optim.Optimizer,
    regime: Regime,
    *,
    coef: float,
    active_coef: float,
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

    ``coef`` is the run's MTP coefficient ``c`` (shadow directions); ``active_coef`` is the
    ``λ`` the run applies at this update (``c``, or the OCC estimate); ``clip``, ``kl_coef`` and
    ``ref_logp`` define the training loss's RL part, or ``rl_loss_of_logp`` replaces it (a
    trainer's own loss as a function of the aligned main log-probs, see
    :func:`decomp.objectives.objectives`).
    """
    named = dict(model.named_parameters())
    params = {k: v.detach() for k, v in named.items()}
    mask = batch.mask.bool()
    with torch.no_grad():
        logp, mtp_logp, valid = model_logprobs(model, params, batch.tokens, attention_mask=batch.attention_mask)
    proxy_mask = mask & valid[0]
    view = batch.response
    proxies = proxy_coefficients(view(mtp_logp[0]), view(logp), view(batch.old_logp), view(proxy_mask), coef)

    records: list[dict[str, Any]] = []
    sweeps: list[dict[str, Any]] = []
    regimes = shadow_regimes(regime, coef, clip)
    coefs = {"active": active_coef, "ce": coef, "policy": coef}
    for direction, reg in regimes.items():
        if direction not in directions:
            continue
        if direction != "active" and records and records[0]["direction"] == "active" and _same_direction(
            reg, regime, coefs[direction], active_coef
        ):
            records.append({**records[0], "direction": direction, "seconds": 0.0})
            continue
        start = time.perf_counter()
        if rl_loss_of_logp is None:
            obj = objectives(model, batch, reg, coef=coefs[direction], clip=clip, kl_coef=kl_coef, ref_logp=ref_logp)
        else:
            obj = objectives(model, batch, reg, coef=coefs[direction], rl_loss_of_logp=rl_loss_of_logp)
        measured = measure_step(
            obj.rl_objective, obj.mtp_loss, named, coef=coefs[direction], optimizer=optimizer, rl_loss=obj.rl_loss
        )
        dec, updates = measured.decomposition, measured.updates
        estimates = dict(proxies)
        # the jvp level: a = ∇ℓ·δ₁, b = ∇ℓ·u_RL by forward mode, once, for both reductions
        a = view(jvp_logprobs(obj.logprob_fn, params, updates.unit_displacement))
        b = view(jvp_logprobs(obj.logprob_fn, params, updates.update_rl))
        for reduction in ("masked", "pooled"):
            estimates[f"jvp_{reduction}"] = float(projection_coefficient(a, b, view(proxy_mask), coef, reduction))
        record: dict[str, Any] = {"direction": direction, "regime_of_direction": reg.name, **dec.to_dict()}
        for name, lam in estimates.items():
            record[f"coef_{name}"] = lam
            record[f"efficiency_{name}"] = efficiency(lam, dec)
        record["seconds"] = time.perf_counter() - start
        records.append(record)
        if sweep and not dec.lambda_star_reason.startswith("the MTP displacement does not move J"):
            grid = sweep_grid(dec.lambda_star, coef)
            result = sweep_coefficients(measured, obj.rl_objective, named, grid)
            sweeps.append({
                "direction": direction, "regime_of_direction": reg.name, "lambda_star": dec.lambda_star,
                "coef": coefs[direction], "coefs": result.coefs, "realized": result.realized,
                "quadratic": result.quadratic,
            })
    curv = None
    if curvature:
        start = time.perf_counter()
        J = objectives(model, batch, regime).rl_objective
        top, bottom = top_eigenvalues(J, params, k=2, which="BE", tol=EIGEN_TOL)
        curv = {"eigenvalue_max": float(top), "eigenvalue_min": float(bottom), "seconds": time.perf_counter() - start}
    return Instrumented(records, sweeps, curv)
