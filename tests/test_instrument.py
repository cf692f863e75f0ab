"""instrument_update on a hand-built batch: estimators on the response-shaped view, exact zeros
for detach, the active OCC direction at a negative coefficient, sweeps only where the direction
moves J, and depth-2 estimates as the mean over depths."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import TINY, make_problem

import decomp.decomposition
from decomp.decomposition import Decomposition, decompose
from decomp.instrument import instrument_update
from decomp.objectives import RolloutBatch, model_logprobs, objectives
from decomp.occ import (
    masked_coefficient,
    pooled_coefficient,
    proxy_coefficients,
    reference_coefficient,
)
from decomp.regimes import OCC, CrossEntropy, Detach, Policy
from decomp.rl import clipped_policy_loss


def _setup(seed=0, prompt_len=4, mtp_depth=1):
    problem = make_problem(seed=seed, prompt_len=prompt_len, cfg=dataclasses.replace(TINY, mtp_depth=mtp_depth))
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
    assert [d["direction"] for d in out.decompositions] == ["active", "ce", "policy", "distill-joint"]


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


def test_moves_objective_tells_a_detach_direction_from_a_ce_one():
    model, batch, _ = _setup()
    named = dict(model.named_parameters())
    moves = {}
    for regime in (Detach(), CrossEntropy()):
        obj = objectives(model, batch, regime)
        moves[regime.name] = decompose(obj.rl_objective, obj.mtp_loss, named, lr=1e-2, coef=0.1).moves_objective
    assert moves == {"detach": False, "ce": True}


def test_sweeps_skip_exactly_the_directions_that_do_not_move_j(monkeypatch):
    """The sweep decision reads ``moves_objective``, not the wording of ``lambda_star_reason``."""

    class Reworded(Decomposition):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            object.__setattr__(self, "lambda_star_reason", "reworded")

    monkeypatch.setattr(decomp.decomposition, "Decomposition", Reworded)  # what the measurement builds
    model, batch, opt = _setup()
    out = instrument_update(model, batch, opt, Detach(scale=0.1), scale=0.1, coef=0.1, sweep=True,
                            directions=("active", "ce", "policy"))
    assert [d["lambda_star_reason"] for d in out.decompositions] == ["reworded"] * 3
    assert [s["direction"] for s in out.sweeps] == ["ce", "policy"]  # not the detach (active) one


def test_depth_two_estimates_are_the_mean_over_depths_and_occ_applies_coef_masked():
    from decomp.training.loop import UpdateLoss

    model, batch, opt = _setup(seed=2, mtp_depth=2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        logp, mtp_logp, valid = model_logprobs(model, params, batch.tokens)
    assert len(mtp_logp) == 2
    r = batch.response
    per_depth = [proxy_coefficients(r(m), r(logp), r(batch.old_logp), r(batch.mask & v), 0.1)
                 for m, v in zip(mtp_logp, valid, strict=True)]
    assert per_depth[0]["masked"] != pytest.approx(per_depth[1]["masked"], rel=1e-3)  # the mean is not depth 1's
    # λ as the training loop applies it: the mean of the depths' OCC terms' coefficients
    regime = OCC(scale=0.1)
    terms = [regime(r(m), r(logp), r(batch.old_logp), r(batch.advantages), r(batch.mask & v))
             for m, v in zip(mtp_logp, valid, strict=True)]
    applied = UpdateLoss(torch.zeros(()), torch.zeros(()), torch.zeros(()), None, terms, logp).coef
    out = instrument_update(model, batch, opt, regime, scale=0.1, coef=applied, directions=("active",))
    (active,) = out.decompositions
    for name in ("reference", "masked", "pooled"):
        mean = (per_depth[0][name] + per_depth[1][name]) / 2
        assert active[f"coef_{name}"] == pytest.approx(mean, rel=1e-12), name
    assert active["coef"] == applied
    assert active["coef"] == pytest.approx(active["coef_masked"], rel=1e-12)


def test_sharing_the_second_order_pass_between_directions_changes_no_number():
    """J's second-order pass built once per split for every direction gives the records of one
    pass per direction, bit for bit (apart from the time they took)."""
    model, batch, opt = _setup(seed=4)
    problem = make_problem(seed=5, prompt_len=4)
    b = problem.batch
    held = RolloutBatch(b.tokens, b.mask, b.advantages, b.old_logp, response_start=3)
    runs = [instrument_update(model, batch, opt, Policy(scale=0.1), scale=0.1, coef=0.1, eval_batch=held,
                              share_second_order=share).decompositions for share in (True, False)]
    strip = [[{k: v for k, v in r.items() if not k.endswith("seconds")} for r in recs] for recs in runs]
    assert len(strip[0]) == 8 and _nan_equal(strip[0], strip[1])


def _nan_equal(a, b) -> bool:
    import math as m

    def norm(v):
        return "nan" if isinstance(v, float) and m.isnan(v) else v

    return [{k: norm(v) for k, v in r.items()} for r in a] == [{k: norm(v) for k, v in r.items()} for r in b]


def test_searching_only_the_held_out_split_leaves_every_other_number_unchanged():
    """``search_splits=("heldout",)``: held-out records equal those of a search on both splits;
    training records lose λ̂ and the estimators' realized gains, and nothing else."""
    model, batch, opt = _setup(seed=4)
    b = make_problem(seed=5, prompt_len=4).batch
    held = RolloutBatch(b.tokens, b.mask, b.advantages, b.old_logp, response_start=3)
    runs = [instrument_update(model, batch, opt, Policy(scale=0.1), scale=0.1, coef=0.1, eval_batch=held,
                              directions=("active",), search_splits=splits).decompositions
            for splits in (("train", "heldout"), ("heldout",))]
    assert all(0 < r["search_seconds"] < r["seconds"] for r in runs[0])
    assert runs[1][0]["search_seconds"] == 0.0 < runs[1][1]["search_seconds"]
    train, held_rec = runs[0]  # the jvp passes: part of the train record's time, none of the held-out's
    assert 0 < train["jvp_seconds"] < train["seconds"] - train["search_seconds"] and held_rec["jvp_seconds"] == 0.0
    both, heldout_only = [[{k: v for k, v in r.items() if not k.endswith("seconds")} for r in recs] for recs in runs]
    assert [r["split"] for r in heldout_only] == ["train", "heldout"]
    assert _nan_equal([both[1]], [heldout_only[1]])
    assert math.isfinite(heldout_only[1]["lambda_hat"]) and math.isfinite(heldout_only[1]["gain_masked"])
    searched = {k for k in both[0] if k.startswith(("lambda_hat", "gain_", "efficiency_", "search_"))}
    assert {"lambda_hat", "gain_hat", "gain_masked", "efficiency_masked", "search_evaluations"} <= searched
    train = heldout_only[0]
    assert train["lambda_hat_reason"] == "not searched" and train["search_evaluations"] == 0
    floats = searched - {"lambda_hat_reason", "search_evaluations", "gain_lambda_star", "lambda_hat_interval",
                         "lambda_hat_near_optimal"}
    assert all(math.isnan(train[k]) for k in floats)
    assert all(math.isnan(x) for x in train["lambda_hat_interval"]) and train["lambda_hat_near_optimal"] == ()
    assert _nan_equal([{k: v for k, v in both[0].items() if k not in searched}],
                      [{k: v for k, v in train.items() if k not in searched}])


def test_a_microbatched_second_order_pass_changes_no_number_beyond_rounding():
    """``hvp_microbatch_rows``: records of J's side built in row chunks equal the whole-batch
    records to float64 rounding (every field but the timings)."""
    model, batch, opt = _setup(seed=4)
    problem = make_problem(seed=5, prompt_len=4)
    b = problem.batch
    held = RolloutBatch(b.tokens, b.mask, b.advantages, b.old_logp, response_start=3)
    runs = [instrument_update(model, batch, opt, Policy(scale=0.1), scale=0.1, coef=0.1, eval_batch=held,
                              share_second_order=False, hvp_microbatch_rows=rows).decompositions
            for rows in (None, 2)]
    assert len(runs[0]) == 8
    _assert_equal_to_rounding(*runs)
    with pytest.raises(ValueError, match="hvp_microbatch_rows"):
        instrument_update(model, batch, opt, Policy(scale=0.1), scale=0.1, coef=0.1, hvp_microbatch_rows=0)


def test_batched_jvp_estimators_change_no_number_beyond_rounding():
    """``batched_jvp``: the jvp estimators from one pass carrying both tangents equal the two
    single-tangent passes to float64 rounding, and so does every realized gain at them."""
    model, batch, opt = _setup(seed=6)
    runs = [instrument_update(model, batch, opt, Policy(scale=0.1), scale=0.1, coef=0.1, directions=("active", "ce"),
                              batched_jvp=batched).decompositions for batched in (False, True)]
    assert len(runs[0]) == 2
    assert all(math.isfinite(r["coef_jvp_masked"]) and r["coef_jvp_masked"] != 0 for r in runs[0])
    _assert_equal_to_rounding(*runs)


def _assert_equal_to_rounding(expected: list[dict], got: list[dict]) -> None:
    """Every field of every record but the timings: floats to float64 rounding, the rest equal."""
    for want, have in zip(expected, got, strict=True):
        for key, value in want.items():
            if key.endswith("seconds"):
                continue
            if isinstance(value, float) and math.isfinite(value):
                assert have[key] == pytest.approx(value, rel=1e-9, abs=1e-14), key
            else:
                assert _nan_equal([{key: value}], [{key: have[key]}]), key


def _held(seed: int, batch_size: int = 6) -> RolloutBatch:
    b = make_problem(seed=seed, prompt_len=4, batch_size=batch_size).batch
    groups = torch.arange(batch_size) // 2  # prompt groups of two rollouts
    return RolloutBatch(b.tokens, b.mask, b.advantages, b.old_logp, response_start=3, groups=groups)


def test_a_second_held_out_batch_of_another_size_adds_its_own_split_and_the_other_batch_optimum():
    """``eval_batch2`` (noise_ceiling): a ``heldout2`` record per direction, judged on its own batch
    — its λ̂ differs from the first batch's — carrying the ``heldout`` record's λ̂ and that λ̂'s
    realized gain on the second batch; the held-out batch's size is free of the mini-batch's, and
    the records before it are those of a run without it."""
    from decomp.instrument import record_count

    model, batch, opt = _setup(seed=4)
    held, held2 = _held(5, batch_size=10), _held(6, batch_size=10)
    kw = dict(scale=0.1, coef=0.1, eval_batch=held, directions=("active", "ce"), group_errors=True,
              search_splits=("heldout", "heldout2"))
    two = instrument_update(model, batch, opt, Policy(scale=0.1), eval_batch2=held2, **kw).decompositions
    one = instrument_update(model, batch, opt, Policy(scale=0.1), **kw).decompositions
    assert len(two) == record_count(("active", "ce"), held, held2) == 6
    assert [(r["direction"], r["split"]) for r in two] == [(d, s) for d in ("active", "ce")
                                                            for s in ("train", "heldout", "heldout2")]
    strip = [[{k: v for k, v in r.items() if not k.endswith("seconds")} for r in recs if r["split"] != "heldout2"]
             for recs in (two, one)]
    assert _nan_equal(*strip)
    for first, second in ((two[1], two[2]), (two[4], two[5])):
        assert first["n_groups"] == second["n_groups"] == 5
        assert second["lambda_hat_other"] == first["lambda_hat"]
        assert second["correlation"] != first["correlation"]
        assert math.isfinite(second["gain_lambda_hat_other"])  # (it may beat gain_hat: off this batch's grid)
    assert "lambda_hat_other" not in two[1] and "lambda_hat_other" not in two[0]
    with pytest.raises(ValueError, match="eval_batch2"):
        instrument_update(model, batch, opt, Policy(scale=0.1), scale=0.1, coef=0.1, eval_batch2=held2)
