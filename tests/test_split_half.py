"""Split-half sign agreement (decomp.reliability): the agreement predicted from a per-group mean
and sd, ``Φ(z)² + Φ(−z)²`` with ``z = √G·mean/sd``, matches the agreement observed between two
independent batches of ``G`` groups, on a synthetic normal pool and on the groups' correlation
contributions ``C_g`` of a real (tiny, float64) problem; ``groups_for_sign_agreement`` inverts it.

Every random draw comes from a fixed NumPy or torch generator; a sign can differ between CPUs
only for a sum within rounding of 0, which these pools do not produce, and every tolerance is
several binomial standard errors wide."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_problem

from decomp.curvature import jvp_logprobs
from decomp.objectives import RolloutBatch, model_logprobs, objectives
from decomp.regimes import Policy
from decomp.reliability import groups_for_sign_agreement, sign_agreement_probability
from decomp.rl import group_advantages
from decomp.updates import step_updates


def split_half_agreement(s: np.ndarray, groups: int, resamples: int, rng: np.random.Generator) -> float:
    """The mean of ``(1 + sign(a)·sign(b))/2`` over ``resamples`` pairs of disjoint batches of
    ``groups`` groups drawn from the pool ``s`` without replacement (``a``, ``b``: the batches'
    sums; a zero sum's sign is a fair coin, so it counts ½)."""
    total = 0.0
    for start in range(0, resamples, 500):
        n = min(500, resamples - start)
        picks = np.argpartition(rng.random((n, s.size)), 2 * groups - 1, axis=1)[:, : 2 * groups]
        rows = s[picks]
        total += float(np.sum(1 + np.sign(rows[:, :groups].sum(1)) * np.sign(rows[:, groups:].sum(1)))) / 2
    return total / resamples


def binomial_margin(p: float, n: int, k: float = 5.0) -> float:
    return k * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("mean, sd", [(0.3, 1.0), (-0.05, 0.4), (2.0, 7.0)])
def test_observed_agreement_of_independent_normal_batches_matches_the_prediction(mean, sd):
    """Two independent batches of ``G`` normal groups (direct draws, and disjoint halves of a
    large pool): the share with the same sign of their sums is ``Φ(z)² + Φ(−z)²``."""
    rng = np.random.default_rng(20251207)
    n = 20000
    for groups in (1, 4, 16, 64):
        predicted = sign_agreement_probability(math.sqrt(groups) * mean / sd)
        a = rng.normal(mean, sd, (n, groups)).sum(1)
        b = rng.normal(mean, sd, (n, groups)).sum(1)
        observed = float(np.mean(np.sign(a) == np.sign(b)))
        assert abs(observed - predicted) <= binomial_margin(predicted, n), (groups, observed, predicted)
    # disjoint halves of one pool (2G ≤ 1/32 of it), predicted from the pool's own mean and sd
    pool = rng.normal(mean, sd, 2048)
    for groups in (4, 32):
        predicted = sign_agreement_probability(math.sqrt(groups) * pool.mean() / pool.std(ddof=1))
        observed = split_half_agreement(pool, groups, 4000, rng)
        assert abs(observed - predicted) <= binomial_margin(predicted, 4000), (groups, observed, predicted)


def test_no_signal_agrees_half_the_time_and_strong_signal_always():
    assert sign_agreement_probability(0.0) == 0.5
    assert sign_agreement_probability(8.0) == pytest.approx(1.0, abs=1e-12)
    z = np.array([-2.0, -0.5, 0.5, 2.0])
    np.testing.assert_allclose(sign_agreement_probability(z), sign_agreement_probability(-z), rtol=0, atol=1e-15)
    assert np.all(np.diff(sign_agreement_probability(np.linspace(0, 4, 9))) > 0)
    # a pool of identical zeros (no group with reward variance): C = 0 everywhere, agreement ½
    assert split_half_agreement(np.zeros(64), 4, 1000, np.random.default_rng(0)) == 0.5


@pytest.mark.parametrize("target", [0.55, 0.7, 0.8, 0.9, 0.99])
@pytest.mark.parametrize("mean, sd", [(0.1, 1.0), (-0.3, 0.2), (5.0, 40.0)])
def test_groups_for_sign_agreement_inverts_the_prediction(target, mean, sd):
    groups = groups_for_sign_agreement(mean, sd, target)
    assert groups > 0
    assert sign_agreement_probability(math.sqrt(groups) * mean / sd) == pytest.approx(target, abs=1e-12)
    # the square law: half the per-group signal-to-noise ratio, four times the groups
    assert groups_for_sign_agreement(mean / 2, sd, target) == pytest.approx(4 * groups, rel=1e-12)
    assert groups_for_sign_agreement(-mean, sd, target) == pytest.approx(groups, rel=1e-12)


def test_groups_for_sign_agreement_edge_cases():
    assert groups_for_sign_agreement(0.0, 1.0, 0.8) == math.inf
    assert groups_for_sign_agreement(math.nan, 1.0, 0.8) == math.inf
    for bad in (0.5, 1.0, 0.3, 1.2):
        with pytest.raises(ValueError, match="target"):
            groups_for_sign_agreement(0.1, 1.0, bad)


def _rollouts(model, groups: int, group_size: int, seed: int, seq_len: int = 10, prompt: int = 4) -> RolloutBatch:
    """Random sequences with ragged responses, rewarded when the first response token is below 5
    (so that ``∇J`` has a direction in expectation), group-normalised advantages, on-policy."""
    gen = torch.Generator().manual_seed(seed)
    B = groups * group_size
    tokens = torch.randint(0, model.cfg.vocab_size, (B, seq_len), generator=gen)
    lengths = torch.randint(2, seq_len - prompt + 1, (B,), generator=gen)
    pos = torch.arange(seq_len - 1)
    mask = (pos[None, :] + 1 >= prompt) & (pos[None, :] + 1 < prompt + lengths[:, None])
    rewards = (tokens[:, prompt] < 5).double()
    adv = group_advantages(rewards, group_size)[:, None].expand(B, seq_len - 1) * mask
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        old, _, _ = model_logprobs(model, params, tokens)
    return RolloutBatch(tokens, mask, adv.to(old.dtype), old, groups=torch.arange(B) // group_size)


def test_predicted_split_half_agreement_of_c_matches_the_observed_one():
    """A real ``δ`` (the policy direction's AdamW displacement from a training batch, float64) and a
    pool of 2048 held-out groups of 4 rollouts: every group's unnormalised contribution
    ``s_g = Σ_{t∈g} M·A·r·(∇ℓ_t·δ)`` from one forward-mode pass (the sign of a batch's ``C`` is
    the sign of its groups' sum); the agreement predicted from the pool's mean and sd of ``s_g``
    matches the share of resampled disjoint halves whose ``C`` agree in sign, and the observed
    curve crosses 0.8 where ``groups_for_sign_agreement`` says."""
    problem = make_problem(seed=0, batch_size=8)
    model, regime = problem.model, Policy(scale=0.1)
    train = _rollouts(model, groups=4, group_size=4, seed=100)
    obj = objectives(model, train, regime, coef=0.1, clip=(0.2, 0.2))
    step = step_updates(obj.rl_objective, obj.mtp_loss, dict(model.named_parameters()), coef=0.1, lr=1e-2,
                        optimizer="adamw", rl_loss=obj.rl_loss)
    pool = _rollouts(model, groups=2048, group_size=4, seed=7)
    pool_obj = objectives(model, pool, regime)
    params = {k: v.detach() for k, v in model.named_parameters()}
    logp, dl = jvp_logprobs(pool_obj.logprob_fn, params, step.updates.displacement, with_value=True)
    with torch.no_grad():
        weight = pool.mask.double() * pool.advantages.double() * torch.exp(logp.double() - pool.old_logp.double())
    s = (weight * dl.double()).sum(1).reshape(2048, 4).sum(1).numpy()
    assert np.mean(s == 0) < 0.3  # groups without reward variance contribute exactly 0
    z1 = s.mean() / s.std(ddof=1)
    assert 0.15 < abs(z1) < 1.0, z1  # a signal that needs a few groups: the curve is informative
    rng = np.random.default_rng(3)
    sizes, observed = [2, 4, 8, 16, 32], []
    for groups in sizes:
        predicted = float(sign_agreement_probability(math.sqrt(groups) * z1))
        observed.append(split_half_agreement(s, groups, 5000, rng))
        # binomial noise (≤ 0.007) plus the normal approximation's error at a few skewed groups
        assert abs(observed[-1] - predicted) <= 0.03, (groups, observed[-1], predicted)
    g_star = groups_for_sign_agreement(float(s.mean()), float(s.std(ddof=1)), 0.8)
    below = [g for g, o in zip(sizes, observed, strict=True) if o < 0.8]
    above = [g for g, o in zip(sizes, observed, strict=True) if o >= 0.8]
    assert below and above and max(below) < g_star * 1.5 and min(above) > g_star / 1.5, (g_star, observed)
