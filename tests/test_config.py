"""The shared MTP and instrumentation settings (decomp.config) and the run config built on them."""

from __future__ import annotations

import pytest

from decomp.config import InstrumentConfig
from decomp.training.config import RunError, TrainConfig


def _due(cfg: InstrumentConfig, every: int, steps: int = 200) -> list[int]:
    return [s for s in range(1, steps + 1) if cfg.due(every, s)]


def test_sweeps_fall_on_the_first_instrumented_step_at_or_after_each_multiple():
    cfg = TrainConfig(decomp_every=4)  # sweep_every=50 is not a multiple of 4
    cfg.validate()
    assert _due(cfg, cfg.sweep_every) == [52, 100, 152, 200]
    assert all(cfg.instruments(s) for s in _due(cfg, cfg.sweep_every))
    assert _due(cfg, cfg.curvature_every) == [52, 100, 152, 200]


@pytest.mark.parametrize("decomp_every,every", [(5, 50), (2, 4), (1, 7), (10, 10)])
def test_a_period_that_is_a_multiple_of_decomp_every_falls_exactly_on_its_multiples(decomp_every, every):
    cfg = InstrumentConfig(decomp_every=decomp_every)
    assert _due(cfg, every) == list(range(every, 201, every))


def test_never_when_either_period_is_zero_and_negative_periods_are_refused():
    assert _due(InstrumentConfig(decomp_every=0), 50) == []
    assert _due(InstrumentConfig(decomp_every=5), 0) == []
    with pytest.raises(ValueError, match="sweep_every must be >= 0"):
        InstrumentConfig(sweep_every=-1).validate()
    with pytest.raises(RunError, match="curvature_every must be >= 0"):
        TrainConfig(curvature_every=-50).validate()


def test_search_splits_are_parsed_and_bad_ones_refused():
    assert InstrumentConfig().searched_splits == ("heldout",)  # the ground truth's split
    assert InstrumentConfig(heldout=False).searched_splits == ("train",)  # no held-out split: in-sample
    assert InstrumentConfig(search_splits=" train, heldout ").searched_splits == ("train", "heldout")
    assert InstrumentConfig(search=False).searched_splits == ()  # search off: no split is searched
    for bad in ("", "test", "train,eval"):
        with pytest.raises(ValueError, match="search_splits must be a comma-separated subset of train, heldout, heldout2"):
            InstrumentConfig(search_splits=bad).validate()


def test_the_noise_ceiling_needs_a_held_out_batch_and_searches_its_second_batch_with_the_first():
    assert InstrumentConfig(noise_ceiling=True).searched_splits == ("heldout", "heldout2")
    assert InstrumentConfig(noise_ceiling=True, search_splits="train").searched_splits == ("train",)
    assert InstrumentConfig(noise_ceiling=True, search=False).searched_splits == ()
    with pytest.raises(ValueError, match="noise_ceiling needs heldout"):
        InstrumentConfig(noise_ceiling=True, heldout=False).validate()
    with pytest.raises(ValueError, match="heldout_groups"):
        InstrumentConfig(heldout_groups=-1).validate()


def test_the_held_out_batch_size_is_its_own_setting():
    import torch

    from decomp.objectives import RolloutBatch
    from decomp.training.loop import heldout_size

    mb = RolloutBatch(torch.zeros(64, 5, dtype=torch.long), torch.ones(64, 4, dtype=torch.bool),
                      torch.zeros(64, 4), torch.zeros(64, 4))
    assert heldout_size(TrainConfig(), mb) == 64
    assert heldout_size(TrainConfig(heldout_groups=32, group_size=8), mb) == 256
