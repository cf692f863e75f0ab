"""Work the measurement leaves out because its result is known exactly, checked against the work
done: a direction that moves no parameter J reads (detach's: ∇L_MTP is 0 on the policy's
parameters) has ΔJ = 0 and zero terms without a forward; the directions of one update share
J(θ + u_RL). In float64."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_problem

from decomp.decomposition import decompose_updates
from decomp.evaluation import first_order_side, forward_pass
from decomp.group_terms import reverse_group_terms
from decomp.objectives import objectives
from decomp.realized import RealizedGain
from decomp.regimes import CrossEntropy, Detach, Policy
from decomp.search import NO_EFFECT
from decomp.updates import moves, step_updates

GROUPS = [torch.tensor([0, 3, 5]), torch.tensor([1]), torch.tensor([2, 4, 6, 7])]


def _steps(regimes, optimizer: str = "adamw"):
    """One update's directions (one RL gradient, as the loop's), naming the policy's parameters."""
    problem = make_problem(seed=3, batch_size=8)
    named = dict(problem.model.named_parameters())
    steps, obj = [], None
    for regime in regimes:
        o = objectives(problem.model, problem.batch, regime, coef=regime.scale, clip=(0.2, 0.2))
        obj = obj or o
        steps.append(step_updates(o.rl_objective, o.mtp_loss, named, coef=regime.scale, lr=1e-2,
                                  optimizer=optimizer, rl_loss=o.rl_loss, first_order=o.first_order,
                                  shared=problem.model.shared_parameter_names(),
                                  rl_grad=steps[0].update_grad if steps else None))
    return problem, obj.rl_objective, steps


def _by_hand(J, step, coef: float) -> float:
    """J(θ + u(λ)) − J(θ + u_RL) from the parameters themselves, every parameter moved."""
    base = {k: step.theta[k] + step.updates.update_rl[k] for k in step.theta}
    delta = step.displacement(coef)
    return float(J({k: base[k] + delta[k] for k in base})) - float(J(base))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_detach_direction_has_zero_gain_without_a_forward(optimizer):
    problem, J, (detach, policy) = _steps((Detach(scale=0.3), Policy(scale=0.1)), optimizer)
    reads = problem.model.shared_parameter_names()
    assert not moves(detach.updates.displacement, reads) and not moves(detach.updates.unit_displacement, reads)
    assert moves(detach.updates.displacement, detach.theta)  # it does move the MTP module's own
    assert moves(policy.updates.displacement, reads)
    coefs = [-1e3, -0.5, 0.3, 2.0, 1e4]
    gain = RealizedGain(J, detach)
    spent = gain.evaluations  # J(θ + u_RL)
    totals, parts = gain.at_coefs(coefs, GROUPS)
    assert gain.evaluations == spent and not totals.any() and not parts.any()
    assert gain.at_with_parts(detach.updates.displacement, GROUPS) == (0.0, [0.0] * len(GROUPS))
    assert gain(0.3) == 0.0 and gain.evaluations == spent
    # a displacement given from elsewhere is evaluated: still is the step's own family of points
    assert gain.at(policy.updates.displacement) != 0.0 and gain.evaluations == spent + 1
    for c in (-0.5, 2.0):  # the work left out finds 0 up to AdamW's decay round trip in δ(λ)
        assert abs(_by_hand(J, detach, c)) <= 1e-13
        assert abs(_by_hand(J, policy, c)) > 1e-7
    measured = decompose_updates(detach, J, groups=GROUPS, search=True)
    assert measured.decomposition.lambda_hat_reason == NO_EFFECT and measured.decomposition.realized == 0.0


def test_a_still_tangent_is_left_out_of_both_group_passes_and_the_others_do_not_change():
    _, J, steps = _steps((Policy(scale=0.1), Detach(scale=0.3), CrossEntropy(scale=0.2)))
    moving = [steps[0], steps[2]]
    for with_detach, without in ((forward_pass(J, steps, GROUPS, "J").terms, forward_pass(J, moving, GROUPS, "J").terms),
                                 (reverse_group_terms(J, steps, GROUPS), reverse_group_terms(J, moving, GROUPS))):
        assert all(v == 0.0 for t in with_detach[1] for v in t)
        for mine, alone in ((with_detach[0], without[0]), (with_detach[2], without[1])):
            for a, b in zip(mine, alone, strict=True):
                assert a == pytest.approx(b, rel=1e-10, abs=1e-15)
        assert any(v != 0.0 for t in with_detach[0] for v in t)
    # the jvp estimators' inputs: zero along detach's δ₁, and its u_RL's ∇ℓ·u_RL beside it
    out = forward_pass(J, steps, GROUPS, "J")
    assert not out.unit_jvps[1].any() and out.unit_jvps[0].any()
    assert torch.equal(out.rl_jvps[1], out.rl_jvps[0])


def test_a_pass_over_still_directions_alone_still_gives_the_log_probs_and_the_rl_jvp():
    from decomp.curvature import jvp_logprobs

    problem, J, (detach,) = _steps((Detach(scale=0.3),))
    out = forward_pass(J, [detach], GROUPS, "J")
    assert all(v == 0.0 for t in out.terms[0] for v in t)
    params = dict(problem.model.named_parameters())
    logp, rl = jvp_logprobs(J.logprobs, params, detach.updates.update_rl, with_value=True)
    assert torch.allclose(out.logp, logp, rtol=1e-12, atol=1e-14)
    assert torch.allclose(out.rl_jvps[0], rl, rtol=1e-12, atol=1e-14) and rl.any()
    assert all(v == 0.0 for t in reverse_group_terms(J, [detach], GROUPS)[0] for v in t)


def test_the_directions_of_one_update_share_j_at_theta_plus_u_rl():
    _, J, (policy, ce) = _steps((Policy(scale=0.1), CrossEntropy(scale=0.2)))
    side = first_order_side(J, policy.theta, [], "J")
    first = decompose_updates(policy, J, side=side, groups=GROUPS)
    second = decompose_updates(ce, J, side=side, groups=GROUPS)
    assert second.gain.evaluations == 1  # its own δ only: θ + u_RL came from the first
    alone = decompose_updates(ce, J, groups=GROUPS)
    assert alone.gain.evaluations == first.gain.evaluations == 3  # θ + u_RL, its δ, θ (the RL step alone)
    assert second.decomposition.realized == alone.decomposition.realized  # the same bits
    assert first.gain.base.serves(ce, None) and not first.gain.base.serves(ce, torch.float64)
    nudged = {k: v + 1e-3 for k, v in ce.updates.update_rl.items()}  # another RL update
    other = dataclasses.replace(ce, updates=dataclasses.replace(ce.updates, update_rl=nudged))
    assert not first.gain.base.serves(other, None)
    assert RealizedGain(J, other, base=first.gain.base).evaluations == 1  # evaluated its own
