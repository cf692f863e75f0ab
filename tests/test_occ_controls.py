"""The controls of occ (``occ_control``): its magnitudes with random signs, its signs at λ*'s magnitude."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import make_problem
from decomp.config import MTPConfig
from decomp.regimes import OCC, make_regime
from decomp.rng import SIGN_STREAM, stream_seed
from decomp.rules import controlled_rule, get_rule, random_signs
from decomp.training.config import TrainConfig
from decomp.training.update import (
    applied_updates,
    backward,
    coefficients,
    forward,
    needs_forward,
    sign_seed,
    update_context,
)

CFG = TrainConfig(regime="occ", seed=7, mtp_scale=0.5)


def _coefs(problem, optimizer, regime, cfg=CFG):
    """``(λ per depth, fallback, context, forward)`` of the coming update as the loop computes them."""
    assert needs_forward(regime)  # the masked proxy reads the forward's log-probs
    ctx = update_context(problem.model, problem.batch, optimizer, regime, cfg, None, heldout=lambda: None)
    fwd = forward(problem.model, regime, problem.batch, None, cfg)
    coefs, fell_back = coefficients(regime, ctx, fwd, 1)
    return coefs, fell_back, ctx, fwd


def _step(problem, optimizer, regime, coefs, ctx, fwd) -> None:
    backward(problem.model, optimizer, fwd.loss_at(coefs), ctx)
    optimizer.step()


def _random_sign_run(seed: int, updates: int) -> tuple[list[float], list[float]]:
    """``(applied λ, plain occ's λ on the same state)`` over ``updates`` updates of a tiny model."""
    problem = make_problem()
    optimizer = torch.optim.AdamW(problem.model.parameters(), lr=3e-3)
    cfg = dataclasses.replace(CFG, occ_control="random_sign", seed=seed)
    controlled, plain = cfg.make_regime(cfg.clip), make_regime("occ", scale=cfg.mtp_scale)
    applied, reference = [], []
    for _ in range(updates):
        rng = torch.get_rng_state()
        coefs, _, ctx, fwd = _coefs(problem, optimizer, controlled, cfg)
        assert torch.equal(torch.get_rng_state(), rng)  # the signs move no other stream
        ref, _, _, _ = _coefs(problem, optimizer, plain, cfg)
        assert ctx.metrics["occ_estimate_abs"] == abs(ref[0])
        applied.append(coefs[0])
        reference.append(ref[0])
        _step(problem, optimizer, controlled, coefs, ctx, fwd)
    return applied, reference


def test_random_sign_applies_occs_magnitude_with_random_reproducible_signs():
    applied, reference = _random_sign_run(seed=7, updates=24)
    assert [abs(a) for a in applied] == [abs(r) for r in reference]  # bit for bit
    nonzero = [(a, r) for a, r in zip(applied, reference, strict=True) if r != 0.0]
    assert len(nonzero) >= 20  # the estimate carries signal from the second update on
    signs = [math.copysign(1.0, a) for a, _ in nonzero]
    assert 0 < signs.count(1.0) < len(signs)  # not all one sign
    flipped = [a == -r for a, r in nonzero]
    assert any(flipped) and not all(flipped)  # the signs are not occ's own (nor all reversed)
    again, _ = _random_sign_run(seed=7, updates=24)
    assert again == applied  # the same seed: the same run, signs included
    other, _ = _random_sign_run(seed=8, updates=12)
    assert [math.copysign(1.0, a) for a in other[1:]] != [math.copysign(1.0, a) for a in applied[1:12]]


def test_sign_seed_is_the_update_index_stream():
    problem = make_problem()
    optimizer = torch.optim.AdamW(problem.model.parameters(), lr=1e-3)
    assert applied_updates(optimizer) == 0 and sign_seed(3, optimizer) == stream_seed(3, 0, SIGN_STREAM)
    for n in range(1, 4):
        problem.model.zero_grad()
        sum(p.sum() for p in problem.model.parameters()).backward()
        optimizer.step()
        assert applied_updates(optimizer) == n and sign_seed(3, optimizer) == stream_seed(3, n, SIGN_STREAM)
    # a resumed optimizer (its state restored) continues the count
    restored = torch.optim.AdamW(problem.model.parameters(), lr=1e-3)
    restored.load_state_dict(optimizer.state_dict())
    assert applied_updates(restored) == 3
    signs = random_signs(123, 64)
    assert signs == random_signs(123, 64) and set(signs) == {-1.0, 1.0}


def test_lambda_star_magnitude_applies_the_proxys_sign_at_lambda_stars_size():
    problem = make_problem()
    optimizer = torch.optim.AdamW(problem.model.parameters(), lr=3e-3)
    cfg = dataclasses.replace(CFG, occ_control="lambda_star_magnitude")
    regime = cfg.make_regime(cfg.clip)
    assert regime.coefficient_rule().needs >= {"logprobs", "updates", "decomposition"}
    seen = {"fallback": 0, "applied": 0, "opposite": 0}
    for _ in range(6):
        coefs, fell_back, ctx, fwd = _coefs(problem, optimizer, regime, cfg)
        plain = make_regime("occ", scale=cfg.mtp_scale, estimator="exact")
        star_ctx = update_context(problem.model, problem.batch, optimizer, plain, cfg, None, heldout=lambda: None)
        star = get_rule("exact").value(star_ctx)
        occ = get_rule("masked").value(ctx)  # the same state's log-probs
        assert ctx.metrics["occ_estimate_abs"] == abs(occ)
        if occ == 0.0 or not math.isfinite(star) or star == 0.0:
            assert fell_back and coefs == (0.0,)
            seen["fallback"] += 1
        else:
            assert not fell_back
            assert abs(coefs[0]) == abs(star)  # λ*'s magnitude, bit for bit
            assert math.copysign(1.0, coefs[0]) == math.copysign(1.0, occ)  # the proxy's sign
            seen["applied"] += 1
            seen["opposite"] += math.copysign(1.0, star) != math.copysign(1.0, occ)
        _step(problem, optimizer, regime, coefs, ctx, fwd)
    assert seen["fallback"] >= 1 and seen["applied"] >= 3  # the first update is on-policy: λ_occ = 0


def test_controlled_rule_keeps_scalar_rules_scalar_and_none_the_rules_values(monkeypatch):
    from decomp.rules import RULES

    class Ctx:
        sign_seed, metrics = 11, {}

    for name, value in {"jvp_masked": 0.25, "masked": (0.5, -0.125)}.items():
        monkeypatch.setitem(RULES, name, dataclasses.replace(RULES[name], compute=lambda ctx, v=value: v))
        assert controlled_rule(name, "none").compute(Ctx()) == value
        out = controlled_rule(name, "random_sign").compute(Ctx())
        assert type(out) is type(value)  # one λ stays one λ (per_depth repeats it), a tuple stays one per depth
        flat, want = (out, value) if isinstance(value, tuple) else ((out,), (value,))
        assert [abs(v) for v in flat] == [abs(v) for v in want]
    Ctx.sign_seed = None
    with pytest.raises(ValueError, match="sign seed"):
        controlled_rule("masked", "random_sign").compute(Ctx())


def test_occ_control_is_validated():
    MTPConfig(regime="occ", occ_control="random_sign").validate()
    MTPConfig(regime="occ-split", occ_control="lambda_star_magnitude").validate()
    with pytest.raises(ValueError, match="occ_control must be one of none, random_sign, lambda_star_magnitude"):
        MTPConfig(regime="occ", occ_control="flip").validate()
    for regime in ("detach", "policy", "cosine", "oracle"):
        with pytest.raises(ValueError, match="needs regime occ or occ-split"):
            MTPConfig(regime=regime, occ_control="random_sign").validate()
    with pytest.raises(ValueError, match="unknown control"):
        OCC(control="flip")
    with pytest.raises(ValueError, match="needs the update's context"):
        t = torch.zeros(2, 3)
        OCC(control="random_sign").coefficient(t, t, t, torch.ones(2, 3, dtype=torch.bool))
    regime = MTPConfig(regime="occ", occ_control="random_sign", occ_estimator="pooled").make_regime()
    assert isinstance(regime, OCC) and regime.control == "random_sign" and regime.estimator == "pooled"


def test_help_config_lists_the_controls(capsys):
    from decomp.training.cli import main

    assert main(["run", "--help-config"]) == 0
    text = capsys.readouterr().out
    assert "occ_control" in text and "random_sign" in text and "lambda_star_magnitude" in text
    assert "split_head_loss" in text


def test_run_logs_the_estimate_before_the_control(tmp_path, cache):
    from decomp.runlog import read_jsonl
    from decomp.training.loop import train

    # seed 0 and test_train's sizes: the session's cached warm start
    cfg = TrainConfig(regime="occ", occ_control="random_sign", steps=3, prompts_per_step=4, group_size=4,
                      sft_target_accuracy=0.3, eval_every=3, decomp_every=0, checkpoint_every=3, sweep_every=0,
                      curvature_every=0)
    train(cfg, tmp_path / "run", cache_dir=cache, progress=False, log=lambda s: None)
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")[1:]
    for m in metrics:
        # |mean_u s_u·|λ_u|| ≤ mean_u |λ_u|: the signs can only cancel
        assert math.isfinite(m["occ_estimate_abs"]) and abs(m["mtp_coef"]) <= m["occ_estimate_abs"] * (1 + 1e-12)
    assert any(m["occ_estimate_abs"] > 0 for m in metrics)
