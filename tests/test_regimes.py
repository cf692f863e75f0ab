"""Regime objects: losses, coefficients and the name registry."""

from __future__ import annotations

import math

import pytest
import torch

from decomp.occ import masked_coefficient, reference_coefficient
from decomp.regimes import (
    OCC,
    REGIMES,
    CrossEntropy,
    Detach,
    DetachInputs,
    Policy,
    make_regime,
)
from decomp.rl import clipped_policy_loss, masked_mean


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 7
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    logp = old + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mtp = old - torch.rand(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    mask = torch.rand(B, T, generator=g) < 0.8
    return mtp.requires_grad_(), logp, old, adv, mask


def test_registry_and_detach_modes():
    assert list(REGIMES) == ["detach", "detach-inputs", "ce", "policy", "occ", "frozen", "distill", "cosine", "oracle",
                             "occ-split"]
    assert [REGIMES[n].detach for n in REGIMES] == ["all", "inputs", "none", "none", "none", "all", "all", "none",
                                                    "none", "none"]  # occ-split: its trunk's term (its head's: all)
    with pytest.raises(ValueError, match="valid regimes: detach, detach-inputs, ce, policy, occ, frozen"):
        make_regime("mtp")
    with pytest.raises(TypeError, match="bad option for regime 'ce'"):
        make_regime("ce", estimator="masked")
    with pytest.raises(ValueError, match="unknown estimator"):
        make_regime("occ", estimator="oracular")
    with pytest.raises(ValueError, match="form"):
        make_regime("policy", form="ppo")


@pytest.mark.parametrize("cls", [Detach, DetachInputs, CrossEntropy])
def test_cross_entropy_regimes(cls):
    mtp, logp, old, adv, mask = _inputs()
    term = cls(scale=0.3)(mtp, logp, old, adv, mask)
    expected = -(mtp * mask).sum() / mask.sum()
    assert torch.allclose(term.unit_loss, expected)
    assert torch.allclose(term.loss, 0.3 * expected)
    assert term.coef == 0.3


def test_policy_ratio_and_reinforce_forms():
    mtp, logp, old, adv, mask = _inputs(1)
    ratio = Policy(scale=0.2)(mtp, logp, old, adv, mask)
    r = torch.exp(mtp - old)
    surrogate = torch.minimum(r * adv, r.clamp(0.8, 1.2) * adv)
    assert torch.allclose(ratio.unit_loss, -masked_mean(surrogate, mask))
    assert torch.allclose(ratio.loss, 0.2 * ratio.unit_loss)
    reinforce = make_regime("policy", scale=0.2, form="reinforce")(mtp, logp, old, adv, mask)
    assert torch.allclose(reinforce.unit_loss, -masked_mean(adv * mtp, mask))
    assert torch.allclose(reinforce.loss, 0.2 * reinforce.unit_loss)
    assert ratio.loss.requires_grad


def test_occ_coefficient_and_reference_scaling_of_advantages():
    mtp, logp, old, adv, mask = _inputs(2)
    occ = OCC(scale=0.5)
    term = occ(mtp, logp, old, adv, mask)
    assert term.coef == pytest.approx(float(masked_coefficient(mtp.detach(), logp, old, mask, 0.5)), rel=1e-14)
    expected = clipped_policy_loss(mtp, old, term.coef * adv, mask)
    assert torch.allclose(term.loss, expected)
    ref = OCC(scale=0.5, estimator="reference")(mtp, logp, old, adv, mask)
    assert ref.coef == pytest.approx(float(reference_coefficient(mtp.detach(), logp, old, mask, 0.5)), rel=1e-14)
    # the coefficient carries no gradient: d loss/d m equals that of the loss at a fixed λ
    (grad,) = torch.autograd.grad(term.loss, mtp)
    fixed = clipped_policy_loss(mtp, old, term.coef * adv, mask)
    (grad_fixed,) = torch.autograd.grad(fixed, mtp)
    assert torch.equal(grad, grad_fixed)


def test_occ_is_zero_on_first_update_and_with_empty_mask():
    mtp, logp, old, adv, mask = _inputs(3)
    assert OCC()(mtp, old.clone(), old, adv, mask).coef == 0.0
    assert OCC()(mtp, logp, old, adv, torch.zeros_like(mask)).coef == 0.0


def test_regime_inputs_are_validated():
    mtp, logp, old, adv, mask = _inputs(4)
    bad = adv.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="advantages"):
        CrossEntropy()(mtp, logp, old, bad, mask)
    with pytest.raises(ValueError, match="shape mismatch"):
        CrossEntropy()(mtp, logp[:, :-1], old, adv, mask)
    with pytest.raises(ValueError, match="scale"):
        CrossEntropy(scale=float("nan"))


def test_applied_unit_loss_times_coef_is_the_applied_term():
    mtp, logp, old, adv, mask = _inputs(5)
    for coef in (0.3, -0.2):
        applied = OCC(scale=0.1).applied_unit_loss(coef, mtp, old, adv, mask)
        assert torch.allclose(coef * applied, clipped_policy_loss(mtp, old, coef * adv, mask))
    # at λ < 0 the reference term is not λ·L_MTP: the clip picks the other branch
    unit = Policy().unit_loss(mtp, old, adv, mask)
    assert not torch.allclose(-0.2 * unit, clipped_policy_loss(mtp, old, -0.2 * adv, mask))
    assert torch.equal(CrossEntropy().applied_unit_loss(-0.2, mtp, old, adv, mask), CrossEntropy().unit_loss(mtp, old, adv, mask))


def test_new_regimes_flags_and_coefficients():
    mtp, logp, old, adv, mask = _inputs()
    from decomp.regimes import Cosine, Distill, DistillJoint, Frozen, Oracle

    frozen = Frozen(scale=0.3)
    assert not frozen.trains_mtp and frozen(mtp, logp, old, adv, mask).coef == 0.0
    assert Distill().mtp_input == "distill" and Distill.detach == "all" and DistillJoint.detach == "none"
    from decomp.rules import RULES, cosine_gate

    cosine = Cosine(scale=0.5)
    assert cosine.rule == "cosine" and RULES["cosine"].needs == {"gradients"}
    assert cosine_gate(0.4, 0.5) == pytest.approx(0.2) and cosine_gate(-0.3, 0.5) == 0.0
    assert cosine_gate(float("nan"), 0.5) == 0.0
    oracle = Oracle(scale=0.1, fallback=0.0)
    assert oracle.rule == "oracle" and "heldout" in RULES["oracle"].needs
    # the oracle applies λ·L_MTP for either sign, so the searched displacement is the applied one
    for coef in (0.7, -0.4):
        term = oracle.term_at(coef, mtp, old, adv, mask)
        assert torch.allclose(term.loss, coef * term.unit_loss)
    assert not torch.allclose(Policy().term_at(-0.4, mtp, old, adv, mask).loss,
                              -0.4 * Policy().term_at(-0.4, mtp, old, adv, mask).unit_loss)


def test_occ_step_estimators_are_applied_by_the_caller():
    from decomp.regimes import OCC
    from decomp.rules import RULES

    mtp, logp, old, adv, mask = _inputs()
    occ = OCC(estimator="trust_region")
    assert occ.rule == "trust_region" and "updates" in RULES[occ.rule].needs
    with pytest.raises(ValueError, match="needs the step.s updates, their forward-mode changes"):
        occ(mtp, logp, old, adv, mask)
    assert occ.term_at(0.25, mtp, old, adv, mask).coef == 0.25
    with pytest.raises(ValueError, match="unknown estimator"):
        OCC(estimator="telepathy")


def test_oracle_applies_the_constrained_optimum_or_its_fallback():
    from decomp.regimes import Oracle
    from decomp.search import NO_EFFECT, RISING

    from decomp.rules import usable_optimum

    rising = RISING.format(bound=10.0)
    assert usable_optimum(3.5, "", 10.0) == 3.5
    assert usable_optimum(-10.0, rising, 10.0) == -10.0  # a trust region: its edge is the optimum
    assert math.isnan(usable_optimum(float("nan"), NO_EFFECT, 10.0))  # undefined: the regime's fallback applies
    # the search's own bound: rising there is undefined
    assert math.isnan(usable_optimum(1e6, RISING.format(bound=1e6), 1e6))
    assert usable_optimum(-2.0, "", 1e6) == -2.0
    # a search out of its budget: λ̂ is its best point, unresolved to rtol but usable
    from decomp.search import BUDGET
    assert usable_optimum(0.7, BUDGET.format(evaluations=44, rtol=0.1), 1e6) == 0.7
    assert usable_optimum(0.7, BUDGET.format(evaluations=44, rtol=0.1), 10.0) == 0.7
    assert Oracle(scale=1.0, fallback=0.25).fallback == 0.25 and OCC().fallback == 0.0
    with pytest.raises(ValueError, match="bound"):
        Oracle(bound=0.0)
