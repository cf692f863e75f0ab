"""``occ-split``: the MTP module trained by its own loss at c, the trunk by occ's term at its estimate."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY as TINY_MODEL
from conftest import make_problem
from decomp.config import MTPConfig
from decomp.regimes import OCC, REGIMES, Detach, Distill, OCCSplit
from decomp.runlog import read_jsonl
from decomp.training.config import TrainConfig
from decomp.training.update import backward, coefficients, forward, update_context

CFG = TrainConfig(regime="occ-split", mtp_scale=0.3)


def _problem(depth: int):
    problem = make_problem(cfg=dataclasses.replace(TINY_MODEL, mtp_depth=depth))
    # off-policy old log-probs, so that the OCC proxy is not 0 and the ratio not 1
    gen = torch.Generator().manual_seed(5)
    old = problem.batch.old_logp + 0.2 * torch.randn(problem.batch.old_logp.shape, generator=gen, dtype=torch.float64)
    return dataclasses.replace(problem, batch=dataclasses.replace(problem.batch, old_logp=old * problem.batch.mask))


def _split(model) -> tuple[list[str], list[str]]:
    shared = set(model.shared_parameter_names())
    names = [n for n, _ in model.named_parameters()]
    return [n for n in names if n in shared], [n for n in names if n not in shared]


def _grads(model, loss, names) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True, retain_graph=True)
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads, strict=True)}


def _applied(problem, regime, coefs) -> dict[str, torch.Tensor]:
    """``.grad`` after the training loop's backward of one update at ``coefs``."""
    optimizer = torch.optim.AdamW(problem.model.parameters(), lr=1e-3)
    ctx = update_context(problem.model, problem.batch, optimizer, regime, CFG, None, heldout=lambda: None)
    backward(problem.model, optimizer, forward(problem.model, regime, problem.batch, None, CFG).loss_at(coefs), ctx)
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in problem.model.named_parameters()}


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("head_loss,head_cls", [("distill", Distill), ("ce", Detach)])
@pytest.mark.parametrize("lam", [0.37, -1.3])
def test_gradients_are_the_heads_loss_on_the_mtp_module_and_occs_term_on_the_trunk(depth, head_loss, head_cls, lam):
    problem = _problem(depth)
    model, batch, c = problem.model, problem.batch, CFG.mtp_scale
    regime = OCCSplit(scale=c, head_loss=head_loss)
    shared, exclusive = _split(model)
    assert exclusive and all(n.startswith("mtp") for n in exclusive)
    coefs = (lam,) * depth
    got = _applied(problem, regime, coefs)

    # the MTP-exclusive parameters: the head regime's whole update (its RL part reaches none of them) at λ = c
    head_fwd = forward(model, head_cls(scale=c), batch, None, CFG)
    want_head = _grads(model, head_fwd.loss_at((c,) * depth).loss, exclusive)
    for n in exclusive:
        torch.testing.assert_close(got[n], want_head[n], rtol=0, atol=1e-12)
    assert any(want_head[n].abs().max() > 1e-6 for n in exclusive)  # the head's loss does move them

    # the shared parameters: ∇L_RL + λ·∇(occ's unit term, as applied at λ), mean over depths
    occ = OCC(scale=c)
    fwd = forward(model, occ, batch, None, CFG)
    unit = torch.stack([occ.applied_unit_loss(lam, d.mtp_x, d.old_logp, d.advantages, d.mask) for d in fwd.depths]).mean()
    g_rl, g_mtp = _grads(model, fwd.rl_loss, shared), _grads(model, unit, shared)
    for n in shared:
        torch.testing.assert_close(got[n], g_rl[n] + lam * g_mtp[n], rtol=0, atol=1e-12)
    assert max(float((lam * g_mtp[n]).abs().max()) for n in shared) > 1e-6  # the MTP term does reach the trunk

    # neither term leaks: occ's own MTP-exclusive gradients are not there, and the head's loss (computed
    # in its own detach mode "all") has none on the shared parameters to add
    g_occ = _grads(model, fwd.loss_at(coefs).loss, exclusive)
    assert any((g_occ[n] - got[n]).abs().max() > 1e-6 for n in exclusive)
    g_head_shared = _grads(model, head_fwd.loss_at((c,) * depth).loss - head_fwd.rl_loss, shared)
    assert all(float(g.abs().max()) == 0.0 for g in g_head_shared.values())


def test_lambda_comes_from_the_occ_rule_and_the_head_loss_is_logged():
    problem = _problem(1)
    optimizer = torch.optim.AdamW(problem.model.parameters(), lr=1e-3)
    split, occ = OCCSplit(scale=0.3), OCC(scale=0.3)
    coefs = []
    for regime in (split, occ):
        ctx = update_context(problem.model, problem.batch, optimizer, regime, CFG, None, heldout=lambda: None)
        fwd = forward(problem.model, regime, problem.batch, None, CFG)
        coefs.append(coefficients(regime, ctx, fwd, 1))
        if regime is split:
            out = fwd.loss_at(coefs[-1][0])
            head = Distill(scale=0.3)
            d = fwd.depths[0]
            assert out.metrics["mtp_head_loss"] == pytest.approx(
                float(head.unit_loss(d.head_x, d.old_logp, d.advantages, d.mask).detach()), rel=1e-12)
            assert ctx.metrics["occ_estimate_abs"] == abs(coefs[-1][0][0])
    assert coefs[0] == coefs[1] and coefs[0][0][0] != 0.0


def test_config_and_registry():
    assert REGIMES["occ-split"] is OCCSplit
    regime = MTPConfig(regime="occ-split", split_head_loss="ce", occ_estimator="pooled",
                       occ_control="random_sign").make_regime((0.1, 0.3))
    assert isinstance(regime, OCCSplit) and isinstance(regime.head_regime, Detach)
    assert (regime.head_loss, regime.estimator, regime.control, regime.clip_low) == ("ce", "pooled", "random_sign", 0.1)
    assert regime.detach == "none" and regime.mtp_input == "logp" and regime.trains_mtp  # the trunk's term is occ's
    assert isinstance(MTPConfig(regime="occ-split").make_regime().head_regime, Distill)
    with pytest.raises(ValueError, match="split_head_loss must be one of distill, ce"):
        MTPConfig(regime="occ-split", split_head_loss="kl").validate()
    with pytest.raises(ValueError, match="needs regime occ-split"):
        MTPConfig(regime="occ", split_head_loss="ce").validate()
    with pytest.raises(ValueError, match="unknown head_loss"):
        OCCSplit(head_loss="kl")


def test_analysis_gives_occ_split_its_own_cluster_and_colour():
    from analysis.figures import color
    from decomp.results.figstyle import REGIME_COLORS, regime_color
    from decomp.results.rundata import Run, cluster_of

    def run(regime: str) -> Run:
        return Run(Path(f"/runs/{regime}"), {"regime": regime, "task": "add", "seed": 0})

    assert cluster_of(run("distill")) == cluster_of(run("detach"))  # one policy trajectory per seed
    assert cluster_of(run("occ-split")) not in (cluster_of(run("detach")), cluster_of(run("occ")))  # its own trunk
    assert regime_color("occ-split") == color("occ-split") == REGIME_COLORS["occ-split"]
    assert list(REGIME_COLORS.values()).count(REGIME_COLORS["occ-split"]) == 1


def test_cli_run(tmp_path, cache, capsys):
    from decomp.training.cli import main

    tiny = {"prompts_per_step": 4, "group_size": 4, "sft_target_accuracy": 0.3, "eval_every": 1,
            "checkpoint_every": 2, "sweep_every": 0, "curvature_every": 0}
    sets = [a for k, v in tiny.items() for a in ("--set", f"{k}={v}")]
    out = tmp_path / "split"
    code = main(["run", "--out", str(out), "--set", "regime=occ-split", "--set", "steps=2", "--decomp-every", "2",
                 "--cache-dir", str(cache), "--no-progress", *sets])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["config"]["regime"] == "occ-split"
    metrics = read_jsonl(out / "metrics.jsonl")[1:]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        for key in ("mtp_coef", "mtp_loss", "pg_loss", "accuracy", "mtp_acceptance_rate"):
            assert math.isfinite(m[key]), (key, m)
        assert m["fallback_updates"] == 0  # the masked proxy is defined wherever there are response tokens
    assert any(m["mtp_coef"] != 0.0 for m in metrics)  # λ_occ is 0 on each batch's first update only
    records = read_jsonl(out / "decomposition.jsonl")
    active = [r for r in records if r["direction"] == "active"]
    assert active and all(r["regime_of_direction"] == "occ-split" for r in active)
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("correlation", "penalty", "displacement_norm")), r
