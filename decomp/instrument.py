"""Instrumentation of one real training update: exact decompositions and every OCC estimator.

Called by the training loop just before an optimizer step, with the live model, the live
optimizer and the mini-batch of that step. For each MTP *direction* —

- ``active``: the run's own regime and coefficient (for ``occ``, this step's estimate ``λ_t``);
- ``ce`` and ``policy``: shadow directions with the fixed coefficient ``c``, measured in every
  run (a ``detach`` run included) to see what joint training would do at this point —

it records every field of :class:`~decomp.decomposition.Decomposition` (with the live AdamW
state), the proxy estimators (``reference``, ``masked``, ``pooled``; they depend only on the
log-probs, so they are the same for every direction), the ``jvp`` estimators
(``jvp_masked``, ``jvp_pooled``, along that direction's ``δ₁`` and ``u_RL``) and each
estimator's efficiency against that direction's ``λ*``.

Nothing here changes the parameters, ``.grad``, the optimizer state or the RNG streams.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from decomp.decomposition import measure_step
from decomp.objectives import RolloutBatch, model_logprobs, objectives
from decomp.occ import efficiency, jvp_coefficient, proxy_coefficients
from decomp.regimes import CrossEntropy, Policy, Regime

DIRECTIONS = ("active", "ce", "policy")


def shadow_regimes(regime: Regime, coef: float) -> dict[str, Regime]:
    """The regimes whose MTP loss defines each direction (see module docstring)."""
    form = getattr(regime, "form", "ratio")
    clips = {"clip_low": getattr(regime, "clip_low", 0.2), "clip_high": getattr(regime, "clip_high", 0.2)}
    return {
        "active": regime,
        "ce": CrossEntropy(coef=coef),
        "policy": Policy(coef=coef, form=form, **clips),
    }


def _same_direction(a: Regime, b: Regime, coef_a: float, coef_b: float) -> bool:
    # e.g. the shadow `ce` direction of a `ce` run is the active direction itself
    return type(a) is type(b) and a == b and coef_a == coef_b


def instrument_update(
    model: nn.Module,
    batch: RolloutBatch,
    optimizer: torch.optim.Optimizer,
    regime: Regime,
    *,
    coef: float,
    active_coef: float,
) -> list[dict[str, Any]]:
    """One record per direction (``active``, ``ce``, ``policy``) for the coming update.

    ``coef`` is the run's MTP coefficient ``c`` (shadow directions); ``active_coef`` is the
    ``λ`` the run applies at this update (``c``, or the OCC estimate).
    """
    named = dict(model.named_parameters())
    params = {k: v.detach() for k, v in named.items()}
    mask = batch.mask.bool()
    with torch.no_grad():
        logp, mtp_logp, valid = model_logprobs(model, params, batch.tokens)
    proxy_mask = mask & valid[0]
    proxies = proxy_coefficients(mtp_logp[0], logp, batch.old_logp, proxy_mask, coef)

    records: list[dict[str, Any]] = []
    regimes = shadow_regimes(regime, coef)
    coefs = {"active": active_coef, "ce": coef, "policy": coef}
    for direction, reg in regimes.items():
        if direction != "active" and _same_direction(reg, regime, coefs[direction], active_coef):
            records.append({**records[0], "direction": direction, "seconds": 0.0})
            continue
        start = time.perf_counter()
        obj = objectives(model, batch, reg)
        measured = measure_step(obj.rl_objective, obj.mtp_loss, named, coef=coefs[direction], optimizer=optimizer)
        dec, updates = measured.decomposition, measured.updates
        estimates = dict(proxies)
        for reduction in ("masked", "pooled"):
            estimates[f"jvp_{reduction}"] = float(
                jvp_coefficient(
                    obj.logprob_fn, params, updates.unit_displacement, updates.update_rl, proxy_mask, coef, reduction
                )
            )
        record: dict[str, Any] = {"direction": direction, "regime_of_direction": reg.name, **dec.to_dict()}
        for name, lam in estimates.items():
            record[f"coef_{name}"] = lam
            record[f"efficiency_{name}"] = efficiency(lam, dec)
        record["seconds"] = time.perf_counter() - start
        records.append(record)
    return records
