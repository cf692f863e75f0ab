"""The k-step realized gain (decomp.horizon) and its place in the reference loop
(decomp.training.horizons): horizon 1 is today's one-step gain, the horizon-aware unit
displacement is the derivative of the real k-step end point where the later gradients do not
depend on λ, the quadratic model is exact there for SGD, and the continuation at the applied λ
is the loop's own next updates, bit for bit."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import make_problem

from decomp.horizon import Horizon, HorizonGain, OptimizerSnapshot, horizon_model, measure_horizon
from decomp.objectives import objectives
from decomp.realized import RealizedGain
from decomp.regimes import Policy
from decomp.runlog import read_jsonl
from decomp.search import realized_optimum
from decomp.training.config import RunError, TrainConfig
from decomp.training.loop import train
from decomp.updates import step_updates

COEFS = (-10.0, -0.1, 0.01, 1.0, 100.0)


def _adamw_problem(steps: int = 2):
    """A float64 tiny model with a real AdamW that has taken ``steps`` updates, its training
    objectives and a held-out objective."""
    problem = make_problem(seed=0, batch_size=8)
    model, regime = problem.model, Policy(scale=0.1)
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW(named.values(), lr=1e-2, weight_decay=0.01)
    obj = objectives(model, problem.batch, regime, coef=0.1, clip=(0.2, 0.2))
    for _ in range(steps):
        opt.zero_grad()
        obj.rl_loss(named).backward()
        opt.step()
    opt.zero_grad()
    heldout = objectives(model, make_problem(seed=1, batch_size=8).batch, regime).rl_objective
    return model, named, opt, obj, heldout


def test_horizon_one_is_the_one_step_realized_gain():
    model, named, opt, obj, J = _adamw_problem()
    step = step_updates(obj.rl_objective, obj.mtp_loss, named, coef=0.1, optimizer=opt, rl_loss=obj.rl_loss)
    theta = {k: v.detach().clone() for k, v in named.items()}
    one_step = RealizedGain(J, step)
    k_step = HorizonGain(J, Horizon(theta, OptimizerSnapshot.of(opt, named), step.update_grad), step.grad_mtp)
    for coef in COEFS:
        assert k_step(coef) == pytest.approx(one_step(coef), rel=1e-9, abs=1e-15), coef
    rows = list(torch.arange(8).split(2))
    a, b = realized_optimum(one_step, row_sets=rows), realized_optimum(k_step, row_sets=rows)
    assert a.coef == b.coef and a.interval == b.interval and a.evaluations == b.evaluations
    # the snapshot is a copy: the live parameters and optimizer state are untouched
    assert all(torch.equal(theta[k], v.detach()) for k, v in named.items())
    live = opt.state_dict()["state"]
    k_step.horizon.endpoint(step.grad_mtp, 5.0)
    assert all(torch.equal(live[i]["exp_avg"], opt.state_dict()["state"][i]["exp_avg"]) for i in live)


def _linear_losses(params, count: int, seed: int):
    """RL losses linear in θ: their gradients do not depend on λ (no feedback)."""
    gen = torch.Generator().manual_seed(seed)
    slopes = [{k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()} for _ in range(count)]
    return tuple((lambda p, s=s: sum((s[k] * p[k]).sum() for k in p)) for s in slopes)


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95)),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.3),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("history", [0, 3])
def test_unit_displacement_over_the_horizon_is_the_derivative_of_the_end_point(name, history):
    """δ₁,k (both moments' paths, decoupled decay) against a central difference of the real
    k-step end point in λ, with later gradients that do not depend on λ (the model's assumption)."""
    gen = torch.Generator().manual_seed(1)
    params = {"a": torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True),
              "b": torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)}
    opt = OPTIMIZERS[name](list(params.values()))
    for loss in _linear_losses(params, history, seed=2):  # a state with history (or none)
        opt.zero_grad()
        loss(params).backward()
        opt.step()
    theta = {k: v.detach().clone() for k, v in params.items()}
    rl_grad = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in theta.items()}
    grad_mtp = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in theta.items()}
    horizon = Horizon(theta, OptimizerSnapshot.of(opt, params), rl_grad, _linear_losses(theta, 4, seed=3))
    unit: dict = {}
    horizon.endpoint(grad_mtp, 0.0, unit)
    h = 1e-6
    plus, minus = horizon.endpoint(grad_mtp, h), horizon.endpoint(grad_mtp, -h)
    for k in theta:
        fd = (plus[k] - minus[k]) / (2 * h)
        assert torch.allclose(unit["total"][k], fd, rtol=1e-5, atol=1e-7), (name, k)
        if name != "sgd-nesterov":  # the tail adds to the one-step δ₁ wherever momentum carries it
            assert not torch.allclose(unit["total"][k], unit["first"][k], rtol=1e-3)


def test_the_horizon_model_is_exact_for_sgd_without_feedback():
    """SGD with momentum is affine in λ: with later gradients independent of λ, θ_k(λ) =
    θ_k(0) + λδ₁,k exactly, so the model's C₁,k and P₁,k are the k-step gain's first and
    second derivatives at 0 (central differences of real end points)."""
    problem = make_problem(seed=0, batch_size=8)
    model, regime = problem.model, Policy(scale=0.1)
    named = dict(model.named_parameters())
    opt = torch.optim.SGD(named.values(), lr=1e-2, momentum=0.9)
    obj = objectives(model, problem.batch, regime, coef=0.1, clip=(0.2, 0.2))
    step = step_updates(obj.rl_objective, obj.mtp_loss, named, coef=0.1, optimizer=opt, rl_loss=obj.rl_loss)
    theta = {k: v.detach().clone() for k, v in named.items()}
    J = objectives(model, make_problem(seed=1, batch_size=8).batch, regime).rl_objective
    horizon = Horizon(theta, OptimizerSnapshot.of(opt, named), step.update_grad, _linear_losses(theta, 3, seed=4))
    gain = HorizonGain(J, horizon, step.grad_mtp)
    rows = list(torch.arange(8).split(2))
    tokens = [float(J.mask[r].sum()) for r in rows]
    model_terms = horizon_model(J, gain, rows, tokens)
    h = 1e-3
    up, down = gain(h), gain(-h)
    assert (up - down) / (2 * h) == pytest.approx(model_terms.correlation_unit_k, rel=1e-5)
    assert -(up + down) / (2 * h * h) == pytest.approx(model_terms.penalty_unit_k, rel=1e-3)
    assert math.isfinite(model_terms.correlation_unit_k_se) and model_terms.correlation_unit_k_se > 0


def test_the_splits_of_one_update_share_their_end_points():
    """The heldout and heldout2 searches step the same coefficients along the same direction: an
    end point asked for again is the one computed before (bit for bit what a fresh continuation
    gives), so a second split costs only its new coefficients; with no room to keep them
    (``cache_bytes = 0``) every end point is computed."""
    model, named, opt, obj, J = _adamw_problem()
    step = step_updates(obj.rl_objective, obj.mtp_loss, named, coef=0.1, optimizer=opt, rl_loss=obj.rl_loss)
    theta = {k: v.detach().clone() for k, v in named.items()}
    future = (objectives(model, make_problem(seed=5, batch_size=8).batch, Policy(scale=0.1), coef=0.1,
                         clip=(0.2, 0.2)).rl_loss,)
    J2 = objectives(model, make_problem(seed=2, batch_size=8).batch, Policy(scale=0.1)).rl_objective
    rows = list(torch.arange(8).split(2))
    shared = Horizon(theta, OptimizerSnapshot.of(opt, named), step.update_grad, future)
    alone = dataclasses.replace(shared, cache_bytes=0)
    records = [measure_horizon(j, h, step.grad_mtp, coef=0.1, row_sets=rows, tokens=[1.0] * 4)
               for h in (shared, alone) for j in (J, J2)]
    assert records[0]["lambda_hat_k"] == records[2]["lambda_hat_k"] and records[1]["gains_k"] == records[3]["gains_k"]
    evaluated = records[2]["evaluations_k"] + records[3]["evaluations_k"]
    assert alone.continuations >= evaluated and shared.continuations < alone.continuations
    again = shared.endpoint(step.grad_mtp, 1.0)
    assert again is shared.endpoint(step.grad_mtp, 1.0)
    assert all(torch.equal(again[k], v) for k, v in alone.endpoint(step.grad_mtp, 1.0).items())


def test_measure_horizon_gives_an_optimum_with_its_interval_and_the_model_beside_it():
    model, named, opt, obj, J = _adamw_problem()
    step = step_updates(obj.rl_objective, obj.mtp_loss, named, coef=0.1, optimizer=opt, rl_loss=obj.rl_loss)
    theta = {k: v.detach().clone() for k, v in named.items()}
    future = tuple(objectives(model, make_problem(seed=s, batch_size=8).batch, Policy(scale=0.1), coef=0.1,
                              clip=(0.2, 0.2)).rl_loss for s in (5, 6))
    horizon = Horizon(theta, OptimizerSnapshot.of(opt, named), step.update_grad, future)
    rows = list(torch.arange(8).split(2))
    tokens = [float(J.mask[r].sum()) for r in rows]
    record = measure_horizon(J, horizon, step.grad_mtp, coef=0.1, row_sets=rows, tokens=tokens, lambda_hat=1.0,
                             shared=set(model.shared_parameter_names()))
    assert record["horizon"] == 3 and 20 <= record["evaluations_k"] <= 44
    lo, hi = record["lambda_hat_k_interval"]
    assert lo <= record["lambda_hat_k"] <= hi and 0.0 <= record["lambda_hat_k_positive_prob"] <= 1.0
    assert record["lambda_hat_k"] in record["lambda_hat_k_near_optimal"]
    # λ̂_k is the best evaluated point: no reported gain beats it
    assert all(g <= record["gain_hat_k"] for g in record["gains_k"])
    for key in ("gain_k_coef", "gain_k_lambda_hat", "correlation_unit_k", "penalty_unit_k",
                "unit_displacement_k_norm", "unit_displacement_first_norm"):
        assert math.isfinite(record[key]), key


# --- in the reference loop ----------------------------------------------------------------------

TINY = TrainConfig(steps=5, prompts_per_step=4, group_size=4, sft_target_accuracy=0.3, eval_every=5,
                   decomp_every=2, checkpoint_every=2, sweep_every=0, curvature_every=0, horizon=3,
                   decomp_directions="active,policy")


def test_the_continuation_at_the_applied_coefficient_is_the_loops_own_next_updates(tmp_path, cache, monkeypatch):
    """A detach run's updates are RL-only on every parameter J reads: the continuation at the
    applied λ must reproduce the loop's parameters k − 1 updates later bit for bit, stepping on
    the very mini-batches the loop trained on (the same for every λ)."""
    import decomp.training.horizons as horizons
    import decomp.training.loop as loop

    after: list[dict] = []  # the live shared parameters and mini-batch of every update, in order
    apply = loop.apply_update

    def recording_apply(state, mb, out, sums):
        apply(state, mb, out, sums)
        shared = state.model.shared_parameter_names()
        after.append({"params": {k: v.detach().clone() for k, v in state.model.named_parameters() if k in shared},
                      "tokens": mb.tokens.clone()})

    checks: list[tuple[int, dict, list]] = []
    measure = horizons.measure_pending

    def checking_measure(state, pending, dtype=None):
        reg, coef = horizons.direction_coefs(state, pending)["active"]
        end = horizons.continuation(state, pending).endpoint(horizons.mtp_gradient(state, pending, reg, coef), coef)
        checks.append((len(after), end, [b.tokens for b, _ in pending.future]))
        return measure(state, pending, dtype)

    monkeypatch.setattr(loop, "apply_update", recording_apply)
    monkeypatch.setattr(horizons, "measure_pending", checking_measure)
    train(dataclasses.replace(TINY, regime="detach"), tmp_path / "run", cache_dir=cache, progress=False,
          log=lambda s: None)
    assert len(checks) == 2  # instrumented at steps 2 and 4, each complete two updates later
    for done, end, futures in checks:
        # measured when the (k−1)-th later mini-batch is drawn, before the loop trains on it
        live = after[done]
        assert all(torch.equal(end[k], v) for k, v in live["params"].items())
        assert all(torch.equal(t, after[done - len(futures) + 1 + i]["tokens"]) for i, t in enumerate(futures))
    records = read_jsonl(tmp_path / "run" / "horizon.jsonl")
    assert [(r["step"], r["completed_step"], r["direction"]) for r in records] == [
        (2, 3, "active"), (2, 3, "policy"), (4, 5, "active"), (4, 5, "policy")]
    for r in records:
        if r["direction"] == "active":  # detach: δ = 0 on every parameter J reads, at any horizon
            assert r["gain_k_coef"] == 0.0 and math.isnan(r["lambda_hat_k"])
        else:
            assert r["horizon"] == 3 and math.isfinite(r["lambda_hat_k"]) and math.isfinite(r["lambda_star_k"])
            assert r["split"] == "heldout" and math.isfinite(r["gain_k_lambda_hat"])


def test_a_resumed_run_writes_the_same_horizon_records(tmp_path, cache):
    """The measurement pending at a checkpoint travels in it: killed after step 3 (its record for
    step 2 written, the checkpoint of step 2 holding it pending), the resumed run rewrites it once."""
    cfg = dataclasses.replace(TINY, regime="policy", decomp_directions="active")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(cfg, whole, cache_dir=cache, progress=False, log=lambda s: None)
    train(cfg, cut, cache_dir=cache, progress=False, log=lambda s: None, stop_after=3)
    assert [r["completed_step"] for r in read_jsonl(cut / "horizon.jsonl")] == [3]
    train(cfg, cut, resume=True, cache_dir=cache, progress=False, log=lambda s: None)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    a, b = strip(read_jsonl(whole / "horizon.jsonl")), strip(read_jsonl(cut / "horizon.jsonl"))
    assert len(a) == 2 and a == b


def test_the_accuracy_after_k_updates_is_the_end_points_own_and_leaves_training_alone(tmp_path, cache, monkeypatch):
    """``horizon_accuracy``: each reported accuracy is the greedy held-out accuracy of a model that
    holds the k-step end point (recomputed here on a copy), each change is the paired mean over
    problems, and the live model is restored bit for bit (the run's metrics equal a run without it)."""
    import copy

    import decomp.training.horizons as horizons
    from decomp.training.warmstart import held_out_rewards

    seen: list[dict] = []
    original = horizons.accuracy_after

    def checking(state, horizon, grad_mtp, coefs):
        out = original(state, horizon, grad_mtp, coefs)
        for name, coef in {"zero": 0.0, **coefs}.items():
            if math.isfinite(coef):
                model = copy.deepcopy(state.model)
                model.load_state_dict(horizon.endpoint(grad_mtp, coef), strict=False)
                seen.append({"name": name, "rewards": held_out_rewards(model, state.policy.task).double()})
        return out

    monkeypatch.setattr(horizons, "accuracy_after", checking)
    cfg = dataclasses.replace(TINY, regime="policy", decomp_directions="active", steps=3)
    train(dataclasses.replace(cfg, horizon_accuracy=True), tmp_path / "with", cache_dir=cache, progress=False,
          log=lambda s: None)
    train(cfg, tmp_path / "without", cache_dir=cache, progress=False, log=lambda s: None)
    (record,) = read_jsonl(tmp_path / "with" / "horizon.jsonl")
    rewards = {s["name"]: s["rewards"] for s in seen}
    assert set(rewards) >= {"zero", "coef"} and record["accuracy_problems"] == rewards["zero"].numel()
    assert record["accuracy_k_zero"] == pytest.approx(float(rewards["zero"].mean()), abs=1e-12)
    for name in ("coef", "lambda_hat_k", "lambda_hat"):
        if name not in rewards:
            assert math.isnan(record[f"accuracy_k_{name}"])
            continue
        d = (rewards[name] - rewards["zero"]).numpy()
        assert record[f"accuracy_k_{name}"] == pytest.approx(float(rewards[name].mean()), abs=1e-12)
        assert record[f"accuracy_k_{name}_change"] == pytest.approx(d.mean(), abs=1e-12)
        assert record[f"accuracy_k_{name}_change_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(d.size), abs=1e-12)

    def strip(rows):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    assert strip(read_jsonl(tmp_path / "with" / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "without" /
                                                                                       "metrics.jsonl"))


@pytest.mark.parametrize(("changes", "message"), [
    ({"horizon": 0}, "horizon must be a positive integer"),
    ({"horizon_accuracy": True}, "set horizon > 1"),
    ({"horizon": 3, "horizon_accuracy": True, "horizon_directions": "policy"}, "must include active"),
    ({"horizon": 3, "decomp_every": 0}, "decomp_every"),
    ({"horizon_directions": "active,bogus"}, "horizon_directions"),
])
def test_bad_horizon_settings_are_refused(changes, message):
    with pytest.raises(RunError, match=message):
        dataclasses.replace(TrainConfig(), **changes).validate()


# --- the oracle over a horizon, with a noise-aware rule ------------------------------------------

def test_noise_aware_rules_apply_what_the_bootstrap_supports():
    from decomp.rules import noise_aware
    from decomp.search import Optimum

    sure = Optimum(2.0, 0.1, "", 20, interval=(0.5, 3.0), positive_prob=1.0)
    unsure = Optimum(2.0, 0.1, "", 20, interval=(-1.0, 3.0), positive_prob=0.75)
    negative = Optimum(-2.0, 0.1, "", 20, interval=(-3.0, -0.1), positive_prob=0.0)
    assert noise_aware(2.0, unsure, "point") == 2.0
    assert noise_aware(2.0, sure, "interval") == 2.0 and noise_aware(2.0, unsure, "interval") == 0.0
    assert noise_aware(-2.0, negative, "interval") == -2.0
    assert noise_aware(2.0, sure, "shrink") == 2.0 and noise_aware(2.0, unsure, "shrink") == pytest.approx(1.0)
    assert noise_aware(-2.0, negative, "shrink") == -2.0
    assert math.isnan(noise_aware(math.nan, sure, "interval"))  # an undefined λ̂ stays undefined (fallback)
    assert math.isnan(noise_aware(2.0, Optimum(2.0, 0.1, "", 20), "interval"))  # no bootstrap: no decision


def test_the_oracle_over_a_horizon_applies_the_k_step_optimum():
    from decomp.regimes import Oracle
    from decomp.rules import UpdateContext, get_rule

    problem = make_problem(seed=0, batch_size=8)
    model = problem.model
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW(named.values(), lr=1e-2)
    held = make_problem(seed=1, batch_size=8).batch
    held = dataclasses.replace(held, groups=torch.arange(8) // 2)
    lookahead = [make_problem(seed=s, batch_size=8).batch for s in (5, 6)]
    asked = []

    def future(n):
        asked.append(n)
        return lookahead[:n]

    def context(regime):
        return UpdateContext(model, problem.batch, opt, regime, coef=0.1, scale=0.1,
                             loss={"clip": (0.2, 0.2), "kl_coef": 0.0, "ref_logp": None, "rl_loss_of_logp": None},
                             heldout=lambda: held, future=future)

    ctx = context(Oracle(scale=0.1, horizon=3, bound=10.0))
    applied = get_rule("oracle").value(ctx)
    expected = realized_optimum(ctx.horizon_gain(3), bound=10.0)
    assert asked == [2] and applied == expected.coef
    one_step = context(Oracle(scale=0.1, bound=10.0))
    assert get_rule("oracle").value(one_step) == realized_optimum(one_step.heldout_gain(), bound=10.0).coef
    interval = context(Oracle(scale=0.1, horizon=3, bound=10.0, noise_rule="interval"))
    searched = realized_optimum(interval.horizon_gain(3), bound=10.0, row_sets=held.group_rows())
    lo, hi = searched.interval
    assert get_rule("oracle").value(interval) == (searched.coef if lo > 0 or hi < 0 else 0.0)
    # a coarser grid (oracle_decades): |λ| ∈ {0.1, 1, 10} each side before the refinement
    coarse = context(Oracle(scale=0.1, horizon=3, bound=10.0, decades=2))
    coarse_search = realized_optimum(coarse.horizon_gain(3), bound=10.0, decades=2)
    powers = {c for c in coarse_search.coefs if c and round(math.log10(abs(c)), 9).is_integer()}
    assert powers == {-10.0, -1.0, -0.1, 0.1, 1.0, 10.0}
    assert get_rule("oracle").value(coarse) == coarse_search.coef


def test_an_oracle_run_over_a_horizon_with_the_interval_rule(tmp_path, cache):
    cfg = dataclasses.replace(TINY, regime="oracle", oracle_horizon=2, oracle_rule="interval", oracle_bound=10.0,
                              steps=2, decomp_every=0, horizon=1)
    train(cfg, tmp_path / "run", cache_dir=cache, progress=False, log=lambda s: None)
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")[1:]
    assert len(metrics) == 2 and all(abs(m["mtp_coef"]) <= 10.0 for m in metrics)


@pytest.mark.parametrize(("changes", "message"), [
    ({"regime": "policy", "oracle_horizon": 2}, "need regime oracle"),
    ({"regime": "oracle", "oracle_rule": "median"}, "oracle_rule must be one of"),
    ({"regime": "oracle", "oracle_horizon": 2, "kl_coef": 0.1}, "kl_coef = 0"),
    ({"regime": "oracle", "oracle_decades": -1}, "oracle_decades must be a non-negative integer"),
    ({"regime": "policy", "oracle_decades": 3}, "need regime oracle"),
])
def test_bad_oracle_settings_are_refused(changes, message):
    with pytest.raises(RunError, match=message):
        dataclasses.replace(TrainConfig(), **changes).validate()


def test_the_second_held_out_batch_judges_the_first_batchs_k_step_optima(tmp_path, cache):
    """With the noise ceiling, the heldout2 record evaluates the heldout record's λ*_k and λ̂_k:
    coefficients that do not share the batch they are judged on."""
    cfg = dataclasses.replace(TINY, regime="policy", decomp_directions="active", noise_ceiling=True, steps=3)
    train(cfg, tmp_path / "run", cache_dir=cache, progress=False, log=lambda s: None)
    first, second = read_jsonl(tmp_path / "run" / "horizon.jsonl")
    assert (first["split"], second["split"]) == ("heldout", "heldout2")
    for key in ("lambda_star_k", "lambda_hat_k"):
        assert second[f"{key}_other"] == first[key]
        assert math.isfinite(second[f"gain_k_{key}_other"]) or not math.isfinite(first[key])
    assert second["gain_k_lambda_hat_k_other"] <= second["gain_hat_k"] or second["lambda_hat_k_other"] \
        not in second["coefs_k"]
