"""The warm start lands in target ± tolerance: the procedure, on scripted accuracies."""

from __future__ import annotations

import pytest
import torch

from decomp.training import warmstart
from decomp.training.config import TrainConfig
from decomp.training.tasks import make_task

TASK = make_task("add")
MODEL = TrainConfig().model_config(TASK)


def _scripted(monkeypatch, accuracies: list[float]) -> list[int]:
    """Held-out accuracies in the given order; each supervised step adds 1 to every weight (so a
    restored state is visible in the weights); returns the list of step counts trained."""
    script = iter(accuracies)
    calls: list[int] = []

    def steps(model, opt, batches, n, mtp_coef):
        calls.append(n)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(n))

    monkeypatch.setattr(warmstart, "held_out_accuracy", lambda model, task: next(script))
    monkeypatch.setattr(warmstart, "_supervised_steps", steps)
    return calls


def test_it_evaluates_densely_near_the_band_and_rolls_back_when_it_overshoots(monkeypatch):
    # 0 → 0.05 (sparse) → 0.22 (within 0.1 of the band: dense) → 0.45 (above: back to the 0.22
    # state, lr/2) → 0.25 → 0.35 (above: back to the 0.25 state, lr/4) → 0.305 (in 0.29–0.31)
    calls = _scripted(monkeypatch, [0.0, 0.05, 0.22, 0.45, 0.25, 0.35, 0.305])
    cfg = warmstart.WarmStartConfig()
    torch.manual_seed(0)
    init = warmstart.MTPTransformer(MODEL).state_dict()
    state, info = warmstart._train(MODEL, TASK, 0, cfg)
    assert calls == [25, 25, 1, 1, 1, 1]
    assert info["accuracy"] == 0.305 and info["rollbacks"] == 2 and info["final_lr"] == cfg.lr / 4
    assert info["steps"] == 54 and info["evaluations"] == 7
    # the kept path: 25 + 25 (0.22) + 1 (0.25) + 1 (0.305); the two overshooting steps were undone
    name = next(iter(init))
    assert torch.allclose(state[name] - init[name], torch.full_like(init[name], 52.0), atol=1e-4)


def test_it_stops_at_the_first_evaluation_in_the_band_from_either_side(monkeypatch):
    for accuracies, expected in (([0.0, 0.291], 0.291), ([0.0, 0.309], 0.309)):
        _scripted(monkeypatch, accuracies)
        _, info = warmstart._train(MODEL, TASK, 0, warmstart.WarmStartConfig())
        assert info["accuracy"] == expected and info["steps"] == 25 and info["rollbacks"] == 0


def test_a_band_never_reached_is_an_error_within_max_steps(monkeypatch):
    calls = _scripted(monkeypatch, [0.0] + [0.1] * 100)
    with pytest.raises(warmstart.WarmStartError, match=r"did not land in 29.0%–31.0% .* within 60 steps"):
        warmstart._train(MODEL, TASK, 0, warmstart.WarmStartConfig(max_steps=60))
    assert calls == [25, 25, 10]


def test_the_settings_reach_the_warm_start_and_its_cache_key():
    cfg = TrainConfig(sft_target_accuracy=0.4, sft_target_tolerance=0.02, sft_max_steps=100).warmstart_config()
    assert (cfg.target_accuracy, cfg.tolerance, cfg.max_steps) == (0.4, 0.02, 100)
    keys = {warmstart._cache_key(MODEL, TASK, 0, c) for c in (cfg, warmstart.WarmStartConfig())}
    assert len(keys) == 2
