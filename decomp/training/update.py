"""One update of the reference loop: its forward, ``λ`` from the regime, its loss and gradient.

Read top to bottom: :func:`forward` (both heads, once) → :func:`coefficients` (the regime's
constant, or its coefficient rule on an :class:`~decomp.rules.UpdateContext`) →
:meth:`UpdateForward.loss_at` → :func:`backward`. The loop builds the context with
:func:`update_context` before the forward and, for rules that need neither the forward's
log-probs nor its gradients, computes ``λ`` before it, so that the rule's passes (updates, jvps,
HVPs, a held-out search) do not sit on top of the forward's graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from decomp.objectives import RolloutBatch, aligned_logprobs, mtp_inputs
from decomp.regimes import MTPTerm, Regime, check_term_inputs
from decomp.rl import clipped_policy_loss, kl_k3, masked_mean
from decomp.rules import ProxyInputs, UpdateContext, get_rule


@dataclass
class DepthInputs:
    """One MTP depth's response-shaped inputs of the MTP term (graph alive in ``mtp_x``)."""

    mtp_x: Tensor  # the MTP head's log-probs (or distillation input) of the response tokens
    logp: Tensor
    old_logp: Tensor
    advantages: Tensor
    mask: Tensor


@dataclass
class UpdateLoss:
    """The training loss of one mini-batch update and its parts (graph alive in ``loss``)."""

    loss: Tensor
    rl_loss: Tensor  # the RL part: clipped surrogate (+ KL)
    pg_loss: Tensor
    kl: Tensor | None
    terms: list[MTPTerm]  # one per MTP depth
    logp: Tensor

    @property
    def coef(self) -> float:
        """λ applied at this update: the mean over depths (each depth's term is ``λ_k·L_k``)."""
        return sum(t.coef for t in self.terms) / len(self.terms)

    @property
    def unit_mtp_loss(self) -> Tensor:
        return torch.stack([t.unit_loss for t in self.terms]).mean()


@dataclass
class UpdateForward:
    """One forward of the mini-batch through both heads: the RL loss, and per depth what the MTP
    term at any ``λ`` is computed from."""

    rl_loss: Tensor
    pg_loss: Tensor
    kl: Tensor | None
    logp: Tensor
    depths: list[DepthInputs]
    regime: Regime

    @property
    def unit_mtp_loss(self) -> Tensor:
        """``L_MTP`` at unit coefficient, the mean over depths (what the cosine gate differentiates)."""
        return torch.stack([self.regime.unit_loss(d.mtp_x, d.old_logp, d.advantages, d.mask)
                            for d in self.depths]).mean()

    def proxy_inputs(self) -> list[ProxyInputs]:
        """Each depth's detached log-probs, as rules on ``logprobs`` read them."""
        return [ProxyInputs(d.mtp_x.detach(), d.logp.detach(), d.old_logp.detach(), d.mask) for d in self.depths]

    def loss_at(self, coefs: tuple[float, ...]) -> UpdateLoss:
        """The loss with each depth's term at its ``λ`` (``coefs``, one per depth)."""
        terms = [self.regime.term_at(c, d.mtp_x, d.old_logp, d.advantages, d.mask)
                 for c, d in zip(coefs, self.depths, strict=True)]
        loss = self.rl_loss + torch.stack([t.loss for t in terms]).mean()
        return UpdateLoss(loss, self.rl_loss, self.pg_loss, self.kl, terms, self.logp)


def forward(model: nn.Module, regime: Regime, mb: RolloutBatch, ref_logp: Tensor | None, cfg: Any) -> UpdateForward:
    """One forward for both heads: the clipped surrogate (+ KL) and the MTP term's inputs."""
    kwargs = {} if mb.attention_mask is None else {"attention_mask": mb.attention_mask}
    main, mtp = model(mb.tokens, detach=regime.detach, **kwargs)
    logp, mtp_logp, valid = aligned_logprobs(main, mtp, mb.tokens)
    mtp_x = mtp_inputs(regime.mtp_input, main, mtp, mtp_logp)
    pg = clipped_policy_loss(logp, mb.old_logp, mb.advantages, mb.mask, cfg.clip_low, cfg.clip_high)
    rl, kl = pg, None
    if ref_logp is not None:
        kl = masked_mean(kl_k3(logp, ref_logp), mb.mask)
        rl = rl + cfg.kl_coef * kl
    # response-shaped views: the reference estimator averages over them (padding included)
    r = mb.response
    depths = [DepthInputs(r(x), r(logp), r(mb.old_logp), r(mb.advantages), r(mb.mask & v))
              for x, v in zip(mtp_x, valid, strict=True)]
    for d in depths:
        check_term_inputs(d.mtp_x, d.logp, d.old_logp, d.advantages, d.mask)
    return UpdateForward(rl, pg, kl, logp, depths, regime)


def update_context(model: nn.Module, mb: RolloutBatch, optimizer: torch.optim.Optimizer, regime: Regime, cfg: Any,
                   ref_logp: Tensor | None, heldout: Callable[[], RolloutBatch]) -> UpdateContext:
    """The coming update as its regime's rule reads it: the step's updates at ``λ = c``, the
    training loss's RL part, and ``heldout`` (called only by a rule that needs it)."""
    loss = {"clip": cfg.clip, "kl_coef": cfg.kl_coef, "ref_logp": ref_logp, "rl_loss_of_logp": None}
    return UpdateContext(model, mb, optimizer, regime, coef=cfg.mtp_scale, scale=cfg.mtp_scale, loss=loss,
                         heldout=heldout, batched_jvp=cfg.model == "builtin")


def needs_forward(regime: Regime) -> bool:
    """Whether the regime's ``λ`` reads the update's own forward (its log-probs or gradients)."""
    return regime.rule is not None and bool(get_rule(regime.rule).needs & {"logprobs", "gradients"})


def coefficients(regime: Regime, ctx: UpdateContext, fwd: UpdateForward | None, depths: int) -> tuple[tuple[float, ...], bool]:
    """``(λ per depth, whether the fallback applied)``: the regime's constant, or its rule on
    ``ctx`` (given the forward ``fwd`` where the rule reads it) with the regime's fallback where
    the rule is undefined."""
    if regime.rule is None:
        assert fwd is not None
        return tuple(regime.coefficient(d.mtp_x, d.logp, d.old_logp, d.mask) for d in fwd.depths), False
    if fwd is not None:
        ctx.provide("forward", fwd)
        ctx.shared.setdefault("logprobs", fwd.proxy_inputs())
    values = get_rule(regime.rule).per_depth(ctx, depths)
    undefined = [not math.isfinite(v) for v in values]
    return tuple(regime.fallback if u else v for u, v in zip(undefined, values, strict=True)), any(undefined)


def backward(model: nn.Module, optimizer: torch.optim.Optimizer, out: UpdateLoss, ctx: UpdateContext) -> None:
    """The update's gradient into ``.grad`` (freeing the forward graph): by backward, or — when
    the rule already took the RL and MTP gradients of this forward (``cosine``) — composed from
    them as ``∇L_RL + λ∇L_MTP``, which saves a backward (for ``λ ≥ 0`` the applied term is then
    exactly ``λ·L_MTP``)."""
    optimizer.zero_grad(set_to_none=True)
    if not ctx.has("gradients"):
        out.loss.backward()
        return
    params = dict(model.named_parameters())
    for name, (g_rl, g_mtp) in ctx.gradients().items():
        g = torch.zeros_like(params[name]) if g_rl is None else g_rl.clone()
        params[name].grad = g if g_mtp is None else g.add_(g_mtp, alpha=out.coef)
