"""Every group's terms for several directions in one reverse-mode pass (decomp.group_terms) against
two independent computations: forward mode over the whole batch, and a reverse-mode second-order
pass on each group alone, in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import make_problem

from decomp.evaluation import forward_group_terms, grouped_side
from decomp.group_terms import padded_rows, reverse_group_terms, split_group_terms
from decomp.objectives import objectives
from decomp.regimes import CrossEntropy, DistillJoint, Policy
from decomp.updates import step_updates


def _steps(optimizer: str, batch_size: int = 8, shared: bool = True):
    """Three directions' updates; ``shared``: they name the policy's parameters (the reverse pass
    then differentiates those alone), as the loop's do."""
    problem = make_problem(seed=1, batch_size=batch_size)
    named = dict(problem.model.named_parameters())
    steps, obj = [], None
    for regime in (Policy(scale=0.1), CrossEntropy(scale=0.3), DistillJoint(scale=0.2)):
        o = objectives(problem.model, problem.batch, regime, coef=regime.scale, clip=(0.2, 0.2))
        obj = obj or o
        steps.append(step_updates(o.rl_objective, o.mtp_loss, named, coef=regime.scale, lr=1e-2, optimizer=optimizer,
                                  rl_loss=o.rl_loss,
                                  shared=problem.model.shared_parameter_names() if shared else None))
    return problem, obj, steps


# ragged groups (sizes 3, 1, 4) as a mini-batch of a step's groups has them: the padding must count zero
RAGGED = [torch.tensor([0, 3, 5]), torch.tensor([1]), torch.tensor([2, 4, 6, 7])]


@pytest.mark.parametrize("optimizer,shared", [("sgd", True), ("adamw", True), ("adamw", False)])
@pytest.mark.parametrize("memory", [1 << 28, 1])  # one chunk, and one group per chunk
def test_one_pass_over_three_directions_matches_forward_mode_and_each_groups_own_pass(optimizer, shared, memory):
    _, obj, steps = _steps(optimizer, shared=shared)
    batched = reverse_group_terms(obj.rl_objective, steps, RAGGED, memory=memory)
    assert len(batched) == len(steps)
    for step, terms in zip(steps, batched, strict=True):
        forward = forward_group_terms(obj.rl_objective, step, RAGGED, "J")
        reverse = grouped_side(obj.rl_objective, step, RAGGED, "autograd", "J").group_terms
        assert len(terms) == len(RAGGED)
        for t, f, r in zip(terms, forward, reverse, strict=True):
            for key, a, b, c in zip(t._fields, t, f, r, strict=True):
                assert a == pytest.approx(b, rel=1e-10, abs=1e-15), key
                assert a == pytest.approx(c, rel=1e-10, abs=1e-15), key
    # not a trivial agreement: the terms differ between groups and are not all zero
    assert len({round(t.penalty_unit, 12) for t in batched[0]}) == len(RAGGED)


def test_padding_and_the_group_of_rows_without_response_tokens():
    idx, valid = padded_rows(RAGGED)
    assert idx.tolist() == [[0, 3, 5, 0], [1, 1, 1, 1], [2, 4, 6, 7]]
    assert valid.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    problem, obj, steps = _steps("adamw")
    rows = [torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])]
    whole = reverse_group_terms(obj.rl_objective, steps[:1], rows)[0][0]
    value = obj.rl_objective.rows_value({k: v.detach() for k, v in problem.model.named_parameters()}, rows[0],
                                        torch.ones(8))
    assert float(value) == pytest.approx(float(obj.rl_objective({k: v.detach() for k, v in
                                                                  problem.model.named_parameters()})), rel=1e-12)
    assert whole.correlation_unit != 0.0


def test_directions_of_different_parameters_are_refused_and_an_objective_without_rows_falls_back():
    problem, obj, steps = _steps("adamw")
    other = make_problem(seed=2, batch_size=8)
    o2 = objectives(other.model, other.batch, Policy(scale=0.1), coef=0.1, clip=(0.2, 0.2))
    foreign = step_updates(o2.rl_objective, o2.mtp_loss, dict(other.model.named_parameters()), coef=0.1, lr=1e-2,
                           optimizer="adamw", rl_loss=o2.rl_loss)
    with pytest.raises(ValueError, match="share θ"):
        reverse_group_terms(obj.rl_objective, [steps[0], foreign], RAGGED)
    obj.rl_objective.rows_logprobs = None  # e.g. an objective built by hand: each step's forward-mode pass
    fallback, forward = split_group_terms(obj.rl_objective, steps, RAGGED, "J")
    assert forward is not None  # forward mode's pass: its per-token derivatives come with it
    for step, terms in zip(steps, fallback, strict=True):
        assert terms == forward_group_terms(obj.rl_objective, step, RAGGED, "J")


def test_an_instrumented_update_gives_the_records_of_each_directions_own_pass(monkeypatch):
    """instrument_update with one pass per split over three directions (reverse mode on held-out
    groups of 6, forward mode on the mini-batch's groups of 2) writes, to float64 rounding, every
    field of the records that each direction's own forward-mode pass gives."""
    import decomp.group_terms as group_terms
    import decomp.instrument as instrument
    from test_instrument import _assert_equal_to_rounding, _setup

    from decomp.objectives import RolloutBatch

    model, batch, opt = _setup(seed=4)
    batch = RolloutBatch(batch.tokens, batch.mask, batch.advantages, batch.old_logp, batch.response_start,
                         groups=torch.arange(batch.tokens.shape[0]) // 2)
    b = make_problem(seed=5, prompt_len=4, batch_size=12).batch
    held = RolloutBatch(b.tokens, b.mask, b.advantages, b.old_logp, response_start=3, groups=torch.arange(12) // 6)
    kw = dict(scale=0.1, coef=0.1, eval_batch=held, directions=("active", "ce", "distill-joint"), group_errors=True)
    calls = []
    reverse = group_terms.reverse_group_terms
    monkeypatch.setattr(group_terms, "reverse_group_terms", lambda *a, **k: calls.append(1) or reverse(*a, **k))
    together = instrument_update_records(instrument, model, batch, opt, kw)
    assert len(calls) == 1  # the held-out split; the mini-batch's groups of 2 go through forward mode
    monkeypatch.setattr(instrument, "batch_directions", lambda model, directions: False)
    alone = instrument_update_records(instrument, model, batch, opt, kw)
    assert len(calls) == 1 and len(together) == len(alone) == 6
    # forward mode on the mini-batch handed the jvp estimators their derivatives: no pass of their own
    assert all(r["jvp_seconds"] == 0.0 for r in together if r["split"] == "train")
    assert all(r["jvp_seconds"] > 0.0 for r in alone if r["split"] == "train" and not r["same_as"])
    _assert_equal_to_rounding(alone, together)
    assert all(r["n_groups"] == (3 if r["split"] == "train" else 2) for r in together if not r["same_as"])


def instrument_update_records(instrument, model, batch, opt, kw):
    return instrument.instrument_update(model, batch, opt, Policy(scale=0.1), **kw).decompositions


@pytest.mark.parametrize("batched", [True, False])  # the tangents under vmap, and one pass each
def test_forward_pass_through_the_clamp_matches_each_groups_reverse_pass_and_gives_the_jvps(batched):
    """Forward mode's per-token chain rule (token_weights) against each group's reverse-mode
    second-order pass, with tokens on both sides of the log-ratio clamp (their weight is 0), and
    its per-token ∇ℓ·δ₁, ∇ℓ·u_RL, ℓ against jvp_logprobs, in float64."""
    from decomp.curvature import jvp_logprobs
    from decomp.evaluation import forward_pass
    from decomp.rl import LOG_RATIO_CLAMP

    problem, obj, steps = _steps("adamw")
    J = obj.rl_objective
    J.old_logp = J.old_logp.clone()
    J.old_logp[0, 5] += 1.5 * LOG_RATIO_CLAMP  # ℓ − ℓ^old below the clamp
    J.old_logp[7, 6] -= 1.5 * LOG_RATIO_CLAMP  # above it
    assert bool(J.mask[0, 5]) and bool(J.mask[7, 6])
    out = forward_pass(J, steps, RAGGED, "J", batched=batched)
    for step, terms in zip(steps, out.terms, strict=True):
        reverse = grouped_side(J, step, RAGGED, "forward", "J").group_terms
        for mine, theirs in zip(terms, reverse, strict=True):
            assert mine == pytest.approx(theirs, rel=1e-9, abs=1e-13)
    params = dict(problem.model.named_parameters())
    for i, step in enumerate(steps):
        logp, unit = jvp_logprobs(J.logprobs, params, step.updates.unit_displacement, with_value=True)
        assert torch.allclose(out.unit_jvps[i], unit, rtol=1e-12, atol=1e-14)
        assert torch.allclose(out.rl_jvps[i], jvp_logprobs(J.logprobs, params, step.updates.update_rl),
                              rtol=1e-12, atol=1e-14)
        assert torch.allclose(out.logp, logp, rtol=1e-12, atol=1e-14)


def test_directions_sharing_the_rl_gradient_get_the_same_update_rl_bit_for_bit():
    problem = make_problem(seed=1, batch_size=8)
    named = dict(problem.model.named_parameters())
    first = None
    for regime in (Policy(scale=0.1), DistillJoint(scale=0.2)):
        o = objectives(problem.model, problem.batch, regime, coef=regime.scale, clip=(0.2, 0.2))
        own = step_updates(o.rl_objective, o.mtp_loss, named, coef=regime.scale, lr=1e-2, optimizer="adamw",
                           rl_loss=o.rl_loss, first_order=o.first_order)
        first = first or own
        given = step_updates(o.rl_objective, o.mtp_loss, named, coef=regime.scale, lr=1e-2, optimizer="adamw",
                             rl_loss=o.rl_loss, first_order=o.first_order, rl_grad=first.update_grad)
        for k in named:
            assert torch.equal(given.updates.update_rl[k], first.updates.update_rl[k])
            assert torch.allclose(given.grad_mtp[k], own.grad_mtp[k], rtol=1e-12, atol=1e-15)
            assert torch.allclose(given.updates.displacement[k], own.updates.displacement[k], rtol=1e-10,
                                  atol=1e-15)
