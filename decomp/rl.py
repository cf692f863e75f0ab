"""Policy-gradient objectives and losses on aligned per-token log-probs ``[B, T]``.

Conventions (docs/method.md §1): ``mask`` marks response tokens; every average is the token mean
``Σ_t M_t x_t / Σ_t M_t`` over the batch (DAPO-style token-level aggregation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from decomp.checks import check_mask, check_same_shape

# exp() of a log-ratio beyond ±20 only happens for broken inputs; clamping (as verl does) keeps
# one such token from producing inf * 0 = nan in the whole loss.
LOG_RATIO_CLAMP = 20.0


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``Σ M x / Σ M`` (``nan`` for an empty mask)."""
    m = check_mask(mask).to(x.dtype)
    return (x * m).sum() / m.sum()


def importance_objective(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """``J = Σ M·A·exp(ℓ − ℓ^old) / Σ M``: the unclipped surrogate to maximise (docs/method.md §1).

    Its gradient at ``ℓ = ℓ^old`` is the policy gradient.
    """
    check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return masked_mean(advantages * ratio, mask)


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> Tensor:
    """PPO/GRPO clipped surrogate loss to minimise.

    ``−mean_M min(r·A, clip(r, 1−ε_low, 1+ε_high)·A)`` with ``r = exp(ℓ − ℓ^old)``.
    """
    check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    return -masked_mean(torch.minimum(unclipped, clipped), mask)


def reinforce_loss(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """``−mean_M A·ℓ``: the REINFORCE loss (same gradient as the surrogate at ``ℓ = ℓ^old``)."""
    check_same_shape(logp=logp, advantages=advantages, mask=mask)
    return -masked_mean(advantages * logp, mask)


def cross_entropy_loss(logp: Tensor, mask: Tensor) -> Tensor:
    """``−mean_M ℓ``: token-mean negative log-likelihood of the sampled tokens."""
    check_same_shape(logp=logp, mask=mask)
    return -masked_mean(logp, mask)


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO advantages: ``(r − mean_group r) / (std_group r + eps)`` for consecutive groups.

    ``rewards`` is ``[B]`` with ``B`` a multiple of ``group_size`` (the samples of one prompt
    are consecutive); the standard deviation is the unbiased one, as in TRL and verl. A group
    whose rewards are all equal gets zero advantages.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"the number of rewards ({rewards.numel()}) must be a multiple of group_size ({group_size})")
    groups = rewards.view(-1, group_size)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
    return ((groups - groups.mean(dim=1, keepdim=True)) / (std + eps)).reshape(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Tensor,
    max_new_tokens: int,
    *,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    greedy: bool = False,
) -> Tensor:
    """Sample (or greedily decode) ``max_new_tokens`` tokens after each prompt from the main head.

    Returns the responses ``[N, max_new_tokens]``; every token after a sequence's first
    ``eos_id`` is replaced by ``pad_id``. Sampling draws only from ``generator``, so a rollout
    is a function of the parameters and the generator's seed. The model is called as
    ``model(tokens, with_mtp=False)`` (the tiny model runs the full prefix; no KV cache is
    needed at its size).
    """
    if temperature <= 0 and not greedy:
        raise ValueError(f"temperature must be positive, got {temperature}")
    tokens = prompts
    finished = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
    out = []
    for _ in range(max_new_tokens):
        logits, _ = model(tokens, with_mtp=False)
        logits = logits[:, -1].float()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        finished |= nxt == eos_id
        out.append(nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    return torch.stack(out, dim=1)


def response_mask(responses: Tensor, eos_id: int) -> Tensor:
    """True on response tokens up to and including the first ``eos_id`` (all, if none)."""
    is_eos = responses == eos_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return ~after_eos


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``k3`` estimator of ``KL(π_θ ‖ π_ref)``: ``exp(ref − ℓ) − (ref − ℓ) − 1`` (≥ 0)."""
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1
