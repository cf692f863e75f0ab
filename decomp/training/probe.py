"""``decomp probe``: one instrumented GRPO-style update of the built-in model on a synthetic batch.

A self-contained look at the measurement library: a random tiny MTP transformer, a batch of
random sequences with random 0/1 rewards (group-normalised advantages), one real AdamW update
under ``detach``, then — at the second mini-batch update of the same rollout batch, where the
log-prob proxy has signal — the exact decomposition of the ``ce`` and ``policy`` MTP directions
with the real AdamW state, the realized optimum λ̂ and every OCC estimator with its realized
efficiency.

The numbers describe a random model on random data: they exercise the machinery, they are not
a finding. The reference RL run is ``decomp run`` / ``decomp compare``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from decomp.instrument import instrument_update
from decomp.models.tiny import ModelConfig, MTPTransformer
from decomp.objectives import RolloutBatch, model_logprobs, objectives
from decomp.regimes import make_regime
from decomp.rl import group_advantages


@dataclass(frozen=True)
class ProbeConfig:
    seed: int = 0  # seeds model, data and sampling
    prompts: int = 4  # distinct prompts in the batch
    group_size: int = 8  # samples per prompt (G)
    prompt_len: int = 6  # tokens before the response
    response_len: int = 10  # response tokens
    lr: float = 1e-3  # AdamW learning rate
    scale: float = 0.1  # c: the MTP coefficient λ of the shadow directions
    dtype: str = "float64"  # measurement precision of the probe model


def _synthetic_batch(model: MTPTransformer, cfg: ProbeConfig, gen: torch.Generator) -> RolloutBatch:
    V = model.cfg.vocab_size
    B = cfg.prompts * cfg.group_size
    T = cfg.prompt_len + cfg.response_len
    prompts = torch.randint(0, V, (cfg.prompts, cfg.prompt_len), generator=gen).repeat_interleave(cfg.group_size, 0)
    responses = torch.randint(0, V, (B, cfg.response_len), generator=gen)
    tokens = torch.cat([prompts, responses], dim=1)
    mask = torch.zeros(B, T - 1, dtype=torch.bool)
    mask[:, cfg.prompt_len - 1 :] = True
    rewards = (torch.rand(B, generator=gen) < 0.5).to(model.embed.weight.dtype)
    adv = group_advantages(rewards, cfg.group_size)[:, None].expand(B, T - 1) * mask
    with torch.no_grad():
        params = {k: v.detach() for k, v in model.named_parameters()}
        old_logp, _, _ = model_logprobs(model, params, tokens)
    return RolloutBatch(tokens, mask, adv, old_logp)


def run_probe(cfg: ProbeConfig = ProbeConfig()) -> dict[str, dict[str, float | str]]:
    """Run the probe and return ``{direction: record}``; see the module docstring."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    model = MTPTransformer(ModelConfig(max_len=cfg.prompt_len + cfg.response_len)).to(dtype).eval()
    batch = _synthetic_batch(model, cfg, gen)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    named = dict(model.named_parameters())

    # first mini-batch update under `detach` (the proxy is exactly 0 here: ℓ = ℓ^old)
    detach = objectives(model, batch, make_regime("detach", scale=cfg.scale))
    start = time.perf_counter()
    opt.zero_grad()
    (-detach.rl_objective(named) + cfg.scale * detach.mtp_loss(named)).backward()
    opt.step()
    step_seconds = time.perf_counter() - start

    # the second update: the decomposition of the ce and policy directions (train split), with
    # the realized optimum λ̂ and every estimator's realized efficiency
    batch = RolloutBatch(batch.tokens, batch.mask, batch.advantages, batch.old_logp,
                         response_start=cfg.prompt_len - 1)
    start = time.perf_counter()
    out = instrument_update(model, batch, opt, make_regime("detach", scale=cfg.scale), scale=cfg.scale,
                            coef=cfg.scale, directions=("ce", "policy"))
    seconds = (time.perf_counter() - start) / 2
    records: dict[str, dict[str, float | str]] = {}
    for record in out.decompositions:
        records[str(record["direction"])] = {**record, "seconds": seconds, "step_seconds": step_seconds}
    return records


ROWS = [
    ("correlation", "C = <g, δ>"),
    ("cross", "X = u_RLᵀHδ"),
    ("penalty", "P = −½δᵀHδ"),
    ("predicted", "C + X − P"),
    ("realized", "ΔJ_MTP realized"),
    ("residual", "realized − predicted"),
    ("cosine", "cos(∇J, −∇L_MTP)"),
    ("lambda_star", "λ* (quadratic model)"),
    ("lambda_hat", "λ̂ (realized optimum)"),
    ("gain_hat", "ΔJ(λ̂)"),
    ("coef_trust_region", "λ trust region"),
    ("coef_jvp_pooled", "λ jvp pooled (× c)"),
    ("coef_reference", "λ proxy reference (× c)"),
    ("coef_masked", "λ proxy masked (× c)"),
    ("efficiency_trust_region", "efficiency trust region"),
    ("efficiency_jvp_pooled", "efficiency jvp pooled"),
    ("efficiency_masked", "efficiency masked"),
]


def format_probe(records: dict[str, dict[str, float | str]]) -> str:
    directions = list(records)
    lines = [f"{'quantity':<24}" + "".join(f"{d:>14}" for d in directions)]
    for key, label in ROWS:
        cells = []
        for d in directions:
            v = records[d][key]
            cells.append(f"{v:>14.4g}" if isinstance(v, float) and not math.isnan(v) else f"{'nan':>14}")
        lines.append(f"{label:<24}" + "".join(cells))
    for d in directions:
        reason = records[d]["lambda_star_reason"]
        if reason:
            lines.append(f"λ* for {d}: nan ({reason})")
    r = records[directions[0]]
    lines.append(
        f"one training step {r['step_seconds']:.3f} s; one exact decomposition with its search "
        + ", ".join(f"{d} {records[d]['seconds']:.3f} s" for d in directions)
    )
    return "\n".join(lines)
