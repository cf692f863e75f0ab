"""Sampling errors of a decomposition record from its prompt groups (decomp.uncertainty): the
groups' contributions add to the whole batch's values in float64, agree with an independent
forward-mode computation, and the standard error is calibrated on a pool of groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_problem
from scipy import stats

from decomp.curvature import jvp_logprobs
from decomp.decomposition import decompose_updates
from decomp.objectives import objectives
from decomp.regimes import Policy
from decomp.uncertainty import SE_FIELDS, group_errors, jackknife_lambda_star, ratio_se
from decomp.updates import step_updates

TERMS = ("correlation", "cross", "penalty", "predicted", "realized", "correlation_unit", "cross_unit", "penalty_unit")


def _measure(batch_size: int = 8, group: int = 2, optimizer: str = "adamw", seed: int = 0):
    problem = make_problem(seed=seed, batch_size=batch_size)
    regime = Policy(scale=0.1)
    obj = objectives(problem.model, problem.batch, regime, coef=0.1, clip=(0.2, 0.2))
    named = dict(problem.model.named_parameters())
    opt_state = None
    step = step_updates(obj.rl_objective, obj.mtp_loss, named, coef=0.1, lr=1e-2, optimizer=optimizer,
                        optimizer_state=opt_state, rl_loss=obj.rl_loss)
    groups = list(torch.arange(batch_size).split(group))
    return problem, obj, step, groups


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_group_contributions_add_to_the_whole_batch_in_float64(optimizer):
    _, obj, step, groups = _measure(optimizer=optimizer)
    whole = decompose_updates(step, obj.rl_objective).decomposition
    grouped = decompose_updates(step, obj.rl_objective, groups=groups).decomposition
    for key in (*TERMS, "lambda_star", "grad_norm_rl", "rl_objective", "realized_rl"):
        a, b = getattr(whole, key), getattr(grouped, key)
        assert a == pytest.approx(b, rel=1e-10, abs=1e-14), key
    assert grouped.n_groups == 4 and whole.n_groups == 0 and math.isnan(whole.correlation_se)
    for key in SE_FIELDS:
        assert math.isfinite(getattr(grouped, f"{key}_se")) and getattr(grouped, f"{key}_se") >= 0, key
    assert not grouped.lambda_star_se < 0  # nan where one group decides the sign of P₁ (unit test below)


def test_group_correlations_match_forward_mode_per_token_changes():
    """``C_g = ⟨∇J_g, δ⟩`` from each group's reverse-mode gradient (grouped_side) against the
    per-token directional derivatives ``∇ℓ_t·δ`` of one forward-mode pass over the batch."""
    from decomp.evaluation import grouped_side

    problem, obj, step, groups = _measure()
    side = grouped_side(obj.rl_objective, step, groups, "autograd", "J")
    params = {k: v.detach() for k, v in problem.model.named_parameters()}
    batch = problem.batch
    dl = jvp_logprobs(obj.logprob_fn, params, step.updates.displacement)  # ∇ℓ_t·δ, [B, T−1]
    with torch.no_grad():
        logp = obj.logprob_fn(params)
        weight = batch.mask.double() * batch.advantages.double() * torch.exp(logp.double() - batch.old_logp.double())
    per_row = (weight * dl.double()).sum(1) / batch.mask.double().sum()
    for terms, idx in zip(side.group_terms, groups, strict=True):
        assert terms.correlation == pytest.approx(float(per_row[idx].sum()), rel=1e-10, abs=1e-15)


def test_the_ratio_standard_error_reduces_to_sd_over_root_g_and_agrees_with_the_jackknife():
    rng = np.random.default_rng(0)
    t = rng.normal(0.3, 1.0, 12) / 12
    # equal token counts: the contributions' sd/√G, with the batch total their mean × G
    assert ratio_se(t, np.full(12, 5.0)) == pytest.approx(np.std(12 * t, ddof=1) / math.sqrt(12), rel=1e-12)
    # unequal counts: the delete-one-group jackknife of the ratio Σs/Σn (a second algorithm)
    n = rng.integers(1, 20, 400).astype(float)
    s = rng.normal(0.5, 1.0, 400) * n
    total = n.sum()
    loo = np.array([(s.sum() - s[g]) / (total - n[g]) for g in range(400)])
    jack = math.sqrt(399 / 400 * np.sum((loo - loo.mean()) ** 2))
    assert ratio_se(s / total, n) == pytest.approx(jack, rel=0.02)
    assert math.isnan(ratio_se([0.1], [3.0]))


def test_lambda_star_jackknife_and_its_undefined_cases():
    unit = np.array([[0.2, 0.0, 0.5], [0.1, 0.05, 0.4], [0.3, -0.02, 0.6], [0.15, 0.01, 0.5]])
    total = unit.sum(0)
    loo = [((total - u)[0] + (total - u)[1]) / (2 * (total - u)[2]) for u in unit]
    expected = math.sqrt(3 / 4 * sum((v - np.mean(loo)) ** 2 for v in loo))
    assert jackknife_lambda_star(unit) == pytest.approx(expected, rel=1e-12)
    unit[0, 2] = -5.0  # P₁ ≤ 0 without one group: no defined error
    assert math.isnan(jackknife_lambda_star(unit))
    errors = group_errors([(0.1, 0, 0.5, 0.1, 0, 0.5)] * 3, [0.0] * 3, [4, 4, 4])
    assert errors["n_groups"] == 3 and errors["correlation_se"] == pytest.approx(0.0, abs=1e-15)
    assert errors["noise_groups"] == pytest.approx(0.0, abs=1e-12)


def test_the_standard_error_of_c_is_calibrated_on_a_pool_of_groups():
    """Fix θ, the optimizer state and the training batch (so ``δ``); a pool of 2048 prompt groups
    of 4 rollouts is the truth; 2000 held-out batches of 8 groups drawn from it: the mean SE² of
    ``C`` matches its observed variance and the 95% t-interval covers the pool's ``C``. Each
    batch's ``C`` and SE are arithmetic over the groups' ``(s_g, n_g)``, which one forward-mode
    pass gives for the whole pool."""
    problem, obj, step, _ = _measure(batch_size=8)
    model, regime = problem.model, Policy(scale=0.1)
    pool = _pool(model, groups=2048, group_size=4, seed=7)
    pool_obj = objectives(model, pool, regime)
    params = {k: v.detach() for k, v in model.named_parameters()}
    dl = jvp_logprobs(pool_obj.logprob_fn, params, step.updates.displacement)
    with torch.no_grad():
        logp = pool_obj.logprob_fn(params)
        weight = pool.mask.double() * pool.advantages.double() * torch.exp(logp.double() - pool.old_logp.double())
    s = (weight * dl.double()).sum(1).reshape(2048, 4).sum(1).numpy()  # Σ over a group's tokens
    n = pool.mask.double().sum(1).reshape(2048, 4).sum(1).numpy()
    truth = s.sum() / n.sum()
    rng = np.random.default_rng(11)
    values, ses = [], []
    for _ in range(2000):
        g = rng.choice(2048, 8, replace=False)
        values.append(s[g].sum() / n[g].sum())
        ses.append(ratio_se(s[g] / n[g].sum(), n[g]))
    values, ses = np.array(values), np.array(ses)
    ratio = np.mean(ses**2) / np.var(values, ddof=1)
    covered = np.mean(np.abs(values - truth) <= stats.t.ppf(0.975, 7) * ses)
    print(f"mean SE²/variance {ratio:.3f}, coverage {covered:.3f}")
    assert 0.8 <= ratio <= 1.25, ratio
    assert 0.925 <= covered <= 0.975, covered


def _pool(model, groups: int, group_size: int, seed: int):
    """Sequences of random tokens with ragged responses and group-normalised ±1 rewards."""
    from decomp.objectives import RolloutBatch, model_logprobs
    from decomp.rl import group_advantages

    gen = torch.Generator().manual_seed(seed)
    B, T, prompt = groups * group_size, 10, 4
    vocab = model.cfg.vocab_size if hasattr(model, "cfg") else 11
    tokens = torch.randint(0, vocab, (B, T), generator=gen)
    lengths = torch.randint(2, T - prompt + 1, (B,), generator=gen)
    pos = torch.arange(T - 1)
    mask = (pos[None, :] + 1 >= prompt) & (pos[None, :] + 1 < prompt + lengths[:, None])
    rewards = (torch.rand(B, generator=gen) < 0.4).double()
    adv = group_advantages(rewards, group_size)[:, None].expand(B, T - 1) * mask
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        old, _, _ = model_logprobs(model, params, tokens)
    return RolloutBatch(tokens, mask, adv.to(old.dtype), old, groups=torch.arange(B) // group_size)


def test_an_instrumented_run_with_group_errors_carries_them_per_split(tmp_path, cache):
    import dataclasses

    from test_train import TINY

    from decomp.runlog import read_jsonl
    from decomp.training.loop import train

    cfg = dataclasses.replace(TINY, steps=2, decomp_every=2, sweep_every=0, curvature_every=0, group_errors=True,
                              decomp_directions="active,policy")
    train(cfg, tmp_path / "run", cache_dir=cache, progress=False, log=lambda s: None)
    records = read_jsonl(tmp_path / "run" / "decomposition.jsonl")
    assert [(r["direction"], r["split"]) for r in records] == [("active", "train"), ("active", "heldout"),
                                                              ("policy", "train"), ("policy", "heldout")]
    for r in records:
        # held out: as many rows as the mini-batch (8), in whole groups of 4; the training
        # mini-batch: half of the step's 16 rows, from 2 to 4 of its groups
        assert r["n_groups"] == 2 if r["split"] == "heldout" else 2 <= r["n_groups"] <= 4
        moves = r["correlation_unit"] != 0.0
        for key in SE_FIELDS:
            assert (math.isfinite(r[f"{key}_se"]) and r[f"{key}_se"] >= 0) or not moves, key


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("batched", [True, False])
def test_forward_mode_group_terms_match_each_groups_own_second_order_pass(optimizer, batched):
    """Every group's six terms from the forward-mode passes over the whole batch
    (forward_group_terms) against a reverse-mode second-order pass on the group alone
    (grouped_side: its own ∇J_g and HVPs), in float64."""
    from decomp.evaluation import forward_group_terms, grouped_side

    _, obj, step, groups = _measure(optimizer=optimizer)
    forward = forward_group_terms(obj.rl_objective, step, groups, "J", batched=batched)
    reverse = grouped_side(obj.rl_objective, step, groups, "autograd", "J").group_terms
    assert len(forward) == len(reverse) == len(groups)
    for f, r in zip(forward, reverse, strict=True):
        for key, a, b in zip(f._fields, f, r, strict=True):
            assert a == pytest.approx(b, rel=1e-10, abs=1e-15), key


def test_errors_need_no_particular_second_order_pass():
    """The records' errors are the same with J's side over the whole batch, in row chunks, or shared."""
    from decomp.evaluation import EvaluationSide

    problem, obj, step, groups = _measure()
    theta = {k: v.detach() for k, v in problem.model.named_parameters()}
    runs = [decompose_updates(step, obj.rl_objective, groups=groups, **kw).decomposition
            for kw in ({}, {"microbatches": 3}, {"side": EvaluationSide.at(obj.rl_objective, theta, [])})]
    for key in (*(f"{t}_se" for t in SE_FIELDS), "lambda_star_se", "noise_groups"):
        for other in runs[1:]:
            assert getattr(other, key) == pytest.approx(getattr(runs[0], key), rel=1e-9, nan_ok=True), key


def test_decompose_takes_the_groups_and_returns_the_same_errors():
    from decomp.decomposition import decompose

    problem, obj, step, groups = _measure()
    named = dict(problem.model.named_parameters())
    dec = decompose(obj.rl_objective, obj.mtp_loss, named, coef=0.1, lr=1e-2, optimizer="adamw",
                    rl_loss=obj.rl_loss, groups=groups, search=True)
    ref = decompose_updates(step, obj.rl_objective, groups=groups, search=True).decomposition
    assert dec.n_groups == len(groups)
    for key in (*(f"{t}_se" for t in SE_FIELDS), "lambda_hat", "lambda_hat_positive_prob"):
        assert getattr(dec, key) == pytest.approx(getattr(ref, key), rel=1e-10, nan_ok=True), key
    assert dec.lambda_hat_interval == pytest.approx(ref.lambda_hat_interval, rel=1e-10)


def test_shared_per_group_passes_give_the_forward_mode_records():
    """One second-order pass per group, built once and shared by two directions
    (grouped_second_order_side), gives the records of the forward-mode group terms (float64)."""
    from decomp.evaluation import first_order_side, grouped_second_order_side
    from decomp.regimes import CrossEntropy

    problem, obj, step, groups = _measure()
    named = dict(problem.model.named_parameters())
    ce = objectives(problem.model, problem.batch, CrossEntropy(scale=0.1), coef=0.1, clip=(0.2, 0.2))
    step_ce = step_updates(ce.rl_objective, ce.mtp_loss, named, coef=0.1, lr=1e-2, optimizer="adamw",
                           rl_loss=ce.rl_loss)
    theta = {k: v.detach() for k, v in named.items()}
    grouped = grouped_second_order_side(obj.rl_objective, theta, [], groups)
    forward = first_order_side(obj.rl_objective, theta, [])
    for s in (step, step_ce):
        a = decompose_updates(s, obj.rl_objective, groups=groups, side=grouped).decomposition
        b = decompose_updates(s, obj.rl_objective, groups=groups, side=forward).decomposition
        for key in (*TERMS, *(f"{t}_se" for t in SE_FIELDS), "lambda_star", "lambda_star_se", "grad_norm_rl",
                    "rl_objective", "realized_rl", "cosine", "noise_groups"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-10, abs=1e-15, nan_ok=True), key
    with pytest.raises(ValueError, match="built on the groups"):
        decompose_updates(step, obj.rl_objective, groups=groups[:2], side=grouped)
