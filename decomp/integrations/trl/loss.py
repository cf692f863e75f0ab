"""TRL's GRPO loss reproduced as a function of decomp's aligned main log-probs, so that the
decomposition's ``u_RL`` follows the update TRL really takes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from trl import GRPOTrainer

from decomp.integrations.trl.align import completion_advantages, completion_mask
from decomp.integrations.trl.support import unsupported_loss_settings


def trl_rl_loss(trainer: GRPOTrainer, inputs: dict[str, Any], old_logp: Tensor) -> Callable[[Tensor], Tensor]:
    """TRL's GRPO loss on this micro-batch as a function of decomp's aligned main log-probs.

    Reproduces ``GRPOTrainer._compute_loss`` (token-level importance ratio, two-sided clipping
    with ``epsilon``/``epsilon_high`` and ``delta``, ``beta``·k3 KL with its optional bias
    correction, and each supported ``loss_type``'s normalisation) times the gradient
    accumulation steps — the loss of a step made of this micro-batch alone. ``old_logp``
    ``[B, C]`` is ``ℓ^old`` (TRL's, or the current log-probs where TRL has none).
    """
    problems = unsupported_loss_settings(trainer)
    if problems:
        raise ValueError(f"the decomposition cannot reproduce TRL's loss with {', '.join(problems)}")
    args = trainer.args
    P = inputs["prompt_ids"].shape[1]
    mask = completion_mask(inputs).to(old_logp.dtype)
    adv = completion_advantages(inputs, old_logp)
    old = old_logp.detach()
    beta = float(trainer.beta)
    ref = inputs.get("ref_per_token_logps") if beta else None
    if beta and ref is None:
        raise ValueError("beta > 0 but the inputs have no ref_per_token_logps")
    eps_low, eps_high = float(trainer.epsilon_low), float(trainer.epsilon_high)
    loss_type = trainer.loss_type
    if loss_type in ("cispo", "dapo"):
        # TRL divides by num_items / processes · accum / steps_per_generation; times accum:
        normalizer = float(inputs["num_items_in_batch"].clamp(min=1.0)) / trainer.accelerator.num_processes
        normalizer = normalizer / args.steps_per_generation

    padding = ~inputs["completion_mask"].bool()

    def loss(logp: Tensor) -> Tensor:
        # TRL's log-probs are 0 at padding (its labels are -100 there); as in TRL, so that the
        # KL's exp(ref − ℓ) cannot overflow on a masked position and turn the sum into nan
        lp = logp[:, P - 1 :].masked_fill(padding, 0.0)
        coef_1 = torch.exp(lp - old)
        if beta:
            per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1
            if args.use_bias_correction_kl:
                per_token_kl = per_token_kl * coef_1
        if loss_type == "cispo":
            per_token = -torch.clamp(coef_1, max=eps_high).detach() * adv * lp
        else:
            coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
            if args.delta is not None:
                coef_1 = torch.clamp(coef_1, max=args.delta)
            per_token = -torch.min(coef_1 * adv, coef_2 * adv)
        if beta:
            per_token = per_token + beta * per_token_kl
        if loss_type == "grpo":
            return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        if loss_type == "bnpo":
            return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
        if loss_type == "dr_grpo":
            return (per_token * mask).sum() / (per_token.shape[0] * trainer.max_completion_length)
        if loss_type == "luspo":
            return (per_token * mask).sum(-1).mean()
        return (per_token * mask).sum() / normalizer  # cispo, dapo

    return loss
