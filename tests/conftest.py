"""Shared fixtures: a tiny MTP transformer and a synthetic RL batch, in float64 by default."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from decomp.model import ModelConfig, MTPTransformer
from decomp.objectives import RolloutBatch, model_logprobs

TINY = ModelConfig(vocab_size=11, max_len=12, d_model=16, n_layers=1, n_heads=2, d_mlp=32, mtp_depth=1)


@dataclass
class Problem:
    model: MTPTransformer
    batch: RolloutBatch

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.named_parameters()}


def make_problem(
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    batch_size: int = 6,
    seq_len: int = 10,
    prompt_len: int = 4,
    cfg: ModelConfig = TINY,
    init_std: float = 0.3,
) -> Problem:
    """A tiny model (weights larger than default init so curvature is not negligible) and a
    batch of random sequences with ragged responses, random advantages and on-policy old
    log-probs."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MTPTransformer(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, init_std, generator=gen)
    model.eval()
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen)
    lengths = torch.randint(2, seq_len - prompt_len + 1, (batch_size,), generator=gen)
    pos = torch.arange(seq_len - 1)
    # aligned index j is token j+1; response tokens are positions prompt_len .. prompt_len+len-1
    mask = (pos[None, :] + 1 >= prompt_len) & (pos[None, :] + 1 < prompt_len + lengths[:, None])
    adv = torch.randn(batch_size, 1, generator=gen, dtype=dtype).expand(batch_size, seq_len - 1).clone()
    with torch.no_grad():
        params = {k: v.detach() for k, v in model.named_parameters()}
        old_logp, _, _ = model_logprobs(model, params, tokens)
    return Problem(model, RolloutBatch(tokens, mask, adv * mask, old_logp))


@pytest.fixture
def problem() -> Problem:
    return make_problem()
