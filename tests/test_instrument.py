"""instrument_update on a hand-built batch: estimators on the response-shaped view, exact zeros
for detach, and the active OCC direction at a negative coefficient."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_problem

from decomp.instrument import instrument_update
from decomp.objectives import RolloutBatch, model_logprobs, objectives
from decomp.occ import masked_coefficient, pooled_coefficient, reference_coefficient
from decomp.regimes import OCC, Detach
from decomp.rl import clipped_policy_loss


def _setup(seed=0, prompt_len=4):
    problem = make_problem(seed=seed, prompt_len=prompt_len)
    b = problem.batch
    batch = RolloutBatch(b.tokens, b.mask, b.advantages, b.old_logp, response_start=prompt_len - 1)
    model = problem.model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    named = dict(model.named_parameters())
    obj = objectives(model, batch, Detach())
    (-obj.rl_objective(named) + obj.mtp_loss(named)).backward()
    opt.step()  # the second update of this batch: ℓ ≠ ℓ^old, so the proxies carry signal
    return model, batch, opt


def test_proxies_use_the_response_shaped_view():
    model, batch, opt = _setup()
    out = instrument_update(model, batch, opt, Detach(scale=0.1), scale=0.1, coef=0.1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    logp, mtp_logp, valid = model_logprobs(model, params, batch.tokens)
    r = batch.response
    m, lp, old, mask = r(mtp_logp[0]), r(logp), r(batch.old_logp), r(batch.mask & valid[0])
    rec = out.decompositions[0]
    assert rec["coef_reference"] == pytest.approx(float(reference_coefficient(m, lp, old, mask, 0.1)), rel=1e-12)
    assert rec["coef_masked"] == pytest.approx(float(masked_coefficient(m, lp, old, mask, 0.1)), rel=1e-12)
    assert rec["coef_pooled"] == pytest.approx(float(pooled_coefficient(m, lp, old, mask, 0.1)), rel=1e-12)
    # the prompt positions would have diluted the reference mean
    full = float(reference_coefficient(mtp_logp[0], logp, batch.old_logp, batch.mask & valid[0], 0.1))
    assert rec["coef_reference"] != pytest.approx(full, rel=1e-3)
    assert rec["direction"] == "active" and rec["correlation"] == 0.0 and rec["penalty"] == 0.0
    assert [d["direction"] for d in out.decompositions] == ["active", "ce", "policy"]


def test_active_occ_direction_at_negative_coefficient_is_the_applied_term():
    model, batch, opt = _setup(seed=1)
    lam = -0.05
    out = instrument_update(model, batch, opt, OCC(scale=0.1), scale=0.1, coef=lam)
    active = out.decompositions[0]
    assert active["coef"] == lam
    # C = ⟨∇J, δ⟩ with δ the displacement of the *applied* term clipped_policy_loss(m, ℓ^old, λA)
    named = dict(model.named_parameters())
    params = {k: v.detach() for k, v in named.items()}
    obj = objectives(model, batch, OCC(scale=0.1), coef=lam)

    def applied(p):
        _, mtp_logp, valid = model_logprobs(model, p, batch.tokens)
        return clipped_policy_loss(mtp_logp[0], batch.old_logp, lam * batch.advantages, batch.mask & valid[0]) / lam

    g1 = torch.func.grad(obj.mtp_loss)(params)
    g2 = torch.func.grad(applied)(params)
    assert all(torch.allclose(g1[k], g2[k], rtol=1e-10, atol=1e-14) for k in params)
    assert math.isfinite(active["correlation"])
