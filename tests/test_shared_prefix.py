"""One prompt's rollouts share their positions before the response: the built-in model runs them
once (``shared_prefix``), and every quantity measured through ``J``'s log-probs is the one the
plain forward gives, in float64 (the log-probs, the groups' terms by forward and reverse mode, a
second-order pass's terms, realized gains)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, make_problem

from decomp.decomposition import decompose_updates
from decomp.evaluation import forward_pass
from decomp.group_terms import reverse_group_terms
from decomp.models.tiny import MTPTransformer
from decomp.objectives import RolloutBatch, model_logprobs, objectives, shared_prefix
from decomp.regimes import CrossEntropy, Policy
from decomp.updates import step_updates

PROMPT = 4  # tokens of every prompt; the response starts at aligned index PROMPT − 1
GROUP = 3  # rollouts per prompt


def _grouped_problem(seed: int = 2, prompts: int = 3):
    """Rollouts in groups of GROUP that share their prompt's PROMPT tokens (ragged responses)."""
    problem = make_problem(seed=seed, batch_size=prompts * GROUP, prompt_len=PROMPT)
    tokens = problem.batch.tokens.clone()
    for g in range(prompts):
        tokens[g * GROUP:(g + 1) * GROUP, :PROMPT] = tokens[g * GROUP, :PROMPT]
    params = problem.params
    with torch.no_grad():
        old, _, _ = model_logprobs(problem.model, params, tokens)
    b = problem.batch
    batch = RolloutBatch(tokens, b.mask, b.advantages, old, response_start=PROMPT - 1,
                         groups=torch.arange(tokens.shape[0]) // GROUP)
    return problem.model, batch


def _unshared(objective):
    """The same objective with its log-prob functions computing every position of every row."""
    objective.logprobs.__self__.prefix = None
    objective.rows_share_prefix = None
    return objective


def test_shared_prefix_finds_each_prompt_once_and_refuses_too_few_repeats():
    model, batch = _grouped_problem()
    rows, owner = shared_prefix(batch.tokens, batch.response_start)
    assert sorted(rows.tolist()) == [0, 3, 6]  # each prompt's first rollout
    assert torch.equal(batch.tokens[rows[owner], :PROMPT - 1], batch.tokens[:, :PROMPT - 1])
    assert shared_prefix(torch.arange(24).view(6, 4), 2) is None  # six distinct prompts of six rows
    assert shared_prefix(batch.tokens, 0) is None


def test_the_model_gives_the_plain_forwards_logits_and_refuses_what_it_cannot_share():
    model, batch = _grouped_problem()
    rows, owner = shared_prefix(batch.tokens, batch.response_start)
    start = batch.response_start
    with torch.no_grad():
        plain, _ = model(batch.tokens, with_mtp=False, logits_from=start)
        shared, _ = model(batch.tokens, with_mtp=False, logits_from=start, shared_prefix=(rows, owner))
        wrong, _ = model(batch.tokens, with_mtp=False, logits_from=start, shared_prefix=(rows, (owner + 1) % 3))
    torch.testing.assert_close(shared, plain, rtol=1e-13, atol=1e-13)
    assert float((wrong - plain).abs().max()) > 1e-3  # the prefix's states do reach the rest
    with pytest.raises(ValueError, match="with_mtp=False"):
        model(batch.tokens, with_mtp=True, logits_from=start, shared_prefix=(rows, owner))
    float32 = MTPTransformer(TINY).float().eval()
    with torch.no_grad():
        a, _ = float32(batch.tokens, with_mtp=False, logits_from=start)
        b, _ = float32(batch.tokens, with_mtp=False, logits_from=start, shared_prefix=(rows, owner))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def _steps(model, batch):
    named = dict(model.named_parameters())
    steps, obj = [], None
    for regime in (Policy(scale=0.1), CrossEntropy(scale=0.3)):
        o = objectives(model, batch, regime, coef=regime.scale, clip=(0.2, 0.2))
        obj = obj or o
        steps.append(step_updates(o.rl_objective, o.mtp_loss, named, coef=regime.scale, lr=1e-2, optimizer="adamw",
                                  rl_loss=o.rl_loss, shared=model.shared_parameter_names()))
    return obj, steps


def _close(a, b, rel=1e-10):
    for x, y in zip(a, b, strict=True):
        for s, t in zip(x, y, strict=True):
            assert s == pytest.approx(t, rel=rel, abs=1e-14)


def test_the_groups_terms_by_forward_and_reverse_mode_equal_the_plain_forwards():
    model, batch = _grouped_problem()
    obj, steps = _steps(model, batch)
    J, rows = obj.rl_objective, batch.group_rows()
    assert J.logprobs.__self__.prefix is not None and J.rows_share_prefix(rows)
    assert not J.rows_share_prefix([torch.tensor([0, 3])])  # two prompts in one set
    forward, reverse = forward_pass(J, steps, rows, "J"), reverse_group_terms(J, steps, rows)
    plain = _unshared(objectives(model, batch, Policy(scale=0.1)).rl_objective)
    _close(forward.terms, forward_pass(plain, steps, rows, "J").terms)
    _close(reverse, reverse_group_terms(plain, steps, rows))
    _close(reverse, forward.terms)


def test_a_second_order_pass_and_the_realized_gains_equal_the_plain_forwards():
    model, batch = _grouped_problem()
    obj, steps = _steps(model, batch)
    plain = _unshared(objectives(model, batch, Policy(scale=0.1)).rl_objective)
    shared = decompose_updates(steps[0], obj.rl_objective, search=True, groups=batch.group_rows())
    alone = decompose_updates(steps[0], plain, search=True, groups=batch.group_rows())
    whole_shared = decompose_updates(steps[0], obj.rl_objective).decomposition  # the HVP pass
    whole_alone = decompose_updates(steps[0], plain).decomposition
    for a, b in ((shared.decomposition, alone.decomposition), (whole_shared, whole_alone)):
        for name in ("correlation", "cross", "penalty", "realized", "lambda_star", "correlation_se", "penalty_se"):
            x, y = getattr(a, name), getattr(b, name)
            assert x == pytest.approx(y, rel=1e-9, abs=1e-15) or (x != x and y != y), name
    assert shared.decomposition.lambda_hat == alone.decomposition.lambda_hat
    assert shared.decomposition.realized != 0.0
