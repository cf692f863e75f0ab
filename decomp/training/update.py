"""One update of the reference loop: its forward, ``λ`` from the regime, its loss and gradient.

Read top to bottom: :func:`forward` (both heads, once) → :func:`coefficients` (the regime's
constant, or its coefficient rule on an :class:`~decomp.rules.UpdateContext`) →
:meth:`UpdateForward.loss_at` → :func:`backward`. The loop builds the context with
:func:`update_context` before the forward and, for rules that need neither the forward's
log-probs nor its gradients, computes ``λ`` before it, so that the rule's passes (updates, jvps,
HVPs, a held-out search) do not sit on top of the forward's graph.

``occ-split`` (:class:`~decomp.regimes.OCCSplit`) adds a second term to the loss, its head's
(``UpdateLoss.head_loss``), and :func:`backward` routes each term to its own parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from decomp.objectives import RolloutBatch, aligned_logprobs, mtp_inputs
from decomp.regimes import MTPTerm, Regime, check_term_inputs
from decomp.rl import clipped_policy_loss, kl_k3, masked_mean
from decomp.rng import SIGN_STREAM, stream_seed
from decomp.rules import ProxyInputs, UpdateContext


@dataclass
class DepthInputs:
    """One MTP depth's response-shaped inputs of the MTP term (graph alive in ``mtp_x``)."""

    mtp_x: Tensor  # the MTP head's log-probs (or distillation input) of the response tokens
    logp: Tensor
    old_logp: Tensor
    advantages: Tensor
    mask: Tensor
    head_x: Tensor | None = None  # occ-split: what its head's loss reads (graph alive)


@dataclass
class UpdateLoss:
    """The training loss of one mini-batch update and its parts (graph alive in ``loss``).

    ``head_loss`` (``occ-split`` only): the MTP module's own term, applied to the MTP-exclusive
    parameters while ``loss`` is applied to the shared ones (:func:`backward`). ``metrics``: per-update
    statistics for the step's metrics record, each averaged over the step's updates.
    """

    loss: Tensor
    rl_loss: Tensor  # the RL part: clipped surrogate (+ KL)
    pg_loss: Tensor
    kl: Tensor | None
    terms: list[MTPTerm]  # one per MTP depth
    logp: Tensor
    head_loss: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)

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
        """The loss with each depth's term at its ``λ`` (``coefs``, one per depth); for
        ``occ-split`` also the head's term, ``mean_k c·L_head,k`` (its unit loss in ``metrics`` as
        ``mtp_head_loss``)."""
        terms = [self.regime.term_at(c, d.mtp_x, d.old_logp, d.advantages, d.mask)
                 for c, d in zip(coefs, self.depths, strict=True)]
        loss = self.rl_loss + torch.stack([t.loss for t in terms]).mean()
        out = UpdateLoss(loss, self.rl_loss, self.pg_loss, self.kl, terms, self.logp)
        head = getattr(self.regime, "head_regime", None)
        if head is not None:
            heads = [head.term_at(head.scale, d.head_x, d.old_logp, d.advantages, d.mask) for d in self.depths]
            out.head_loss = torch.stack([t.loss for t in heads]).mean()
            out.metrics["mtp_head_loss"] = float(torch.stack([t.unit_loss for t in heads]).mean().detach())
        return out


def forward(model: nn.Module, regime: Regime, mb: RolloutBatch, ref_logp: Tensor | None, cfg: Any) -> UpdateForward:
    """One forward for both heads: the clipped surrogate (+ KL) and the MTP term's inputs."""
    kwargs = {} if mb.attention_mask is None else {"attention_mask": mb.attention_mask}
    main, mtp = model(mb.tokens, detach=regime.detach, **kwargs)
    logp, mtp_logp, valid = aligned_logprobs(main, mtp, mb.tokens)
    mtp_x = mtp_inputs(regime.mtp_input, main, mtp, mtp_logp)
    head = getattr(regime, "head_regime", None)  # occ-split: its head's loss reads its own input
    head_x = [None] * len(mtp_x) if head is None else mtp_inputs(head.mtp_input, main, mtp, mtp_logp)
    pg = clipped_policy_loss(logp, mb.old_logp, mb.advantages, mb.mask, cfg.clip_low, cfg.clip_high)
    rl, kl = pg, None
    if ref_logp is not None:
        kl = masked_mean(kl_k3(logp, ref_logp), mb.mask)
        rl = rl + cfg.kl_coef * kl
    # response-shaped views: the reference estimator averages over them (padding included)
    r = mb.response
    depths = [DepthInputs(r(x), r(logp), r(mb.old_logp), r(mb.advantages), r(mb.mask & v),
                          None if h is None else r(h))
              for x, h, v in zip(mtp_x, head_x, valid, strict=True)]
    for d in depths:
        check_term_inputs(d.mtp_x, d.logp, d.old_logp, d.advantages, d.mask)
    return UpdateForward(rl, pg, kl, logp, depths, regime)


def update_context(model: nn.Module, mb: RolloutBatch, optimizer: torch.optim.Optimizer, regime: Regime, cfg: Any,
                   ref_logp: Tensor | None, heldout: Callable[[], RolloutBatch],
                   future: Callable[[int], list[RolloutBatch]] | None = None) -> UpdateContext:
    """The coming update as its regime's rule reads it: the step's updates at ``λ = c``, the
    training loss's RL part, ``heldout`` (called only by a rule that needs it), ``future`` (``n``
    lookahead mini-batches, for a rule over a horizon) and the update's sign seed (:func:`sign_seed`)."""
    loss = {"clip": cfg.clip, "kl_coef": cfg.kl_coef, "ref_logp": ref_logp, "rl_loss_of_logp": None}
    return UpdateContext(model, mb, optimizer, regime, coef=cfg.mtp_scale, scale=cfg.mtp_scale, loss=loss,
                         heldout=heldout, batched_jvp=cfg.model == "builtin", sign_seed=sign_seed(cfg.seed, optimizer),
                         future=future)


def applied_updates(optimizer: torch.optim.Optimizer) -> int:
    """How many updates ``optimizer`` has applied: the largest ``step`` in its state (AdamW's
    per-parameter count; 0 before the first). The trunk takes a gradient at every update, so the
    largest count is the run's update index: ``(step − 1)·epochs·num_minibatches + update``, kept
    by a checkpoint."""
    return max((int(state["step"]) for state in optimizer.state.values() if "step" in state), default=0)


def sign_seed(seed: int, optimizer: torch.optim.Optimizer) -> int:
    """The seed of the update's random signs (``occ_control=random_sign``): a stream of its own
    per ``(seed, update index)`` (:data:`decomp.rng.SIGN_STREAM`), so the signs neither move the
    training stream nor change when a run is resumed."""
    return stream_seed(seed, applied_updates(optimizer), SIGN_STREAM)


def needs_forward(regime: Regime) -> bool:
    """Whether the regime's ``λ`` reads the update's own forward (its log-probs or gradients)."""
    rule = regime.coefficient_rule()
    return rule is not None and bool(rule.needs & {"logprobs", "gradients"})


def coefficients(regime: Regime, ctx: UpdateContext, fwd: UpdateForward | None, depths: int) -> tuple[tuple[float, ...], bool]:
    """``(λ per depth, whether the fallback applied)``: the regime's constant, or its rule on
    ``ctx`` (given the forward ``fwd`` where the rule reads it) with the regime's fallback where
    the rule is undefined."""
    rule = regime.coefficient_rule()
    if rule is None:
        assert fwd is not None
        return tuple(regime.coefficient(d.mtp_x, d.logp, d.old_logp, d.mask) for d in fwd.depths), False
    if fwd is not None:
        ctx.provide("forward", fwd)
        ctx.shared.setdefault("logprobs", fwd.proxy_inputs())
    values = rule.per_depth(ctx, depths)
    undefined = [not math.isfinite(v) for v in values]
    return tuple(regime.fallback if u else v for u, v in zip(undefined, values, strict=True)), any(undefined)


def backward(model: nn.Module, optimizer: torch.optim.Optimizer, out: UpdateLoss, ctx: UpdateContext) -> None:
    """The update's gradient into ``.grad`` (freeing the forward graph): by backward, or — when
    the rule already took the RL and MTP gradients of this forward (``cosine``) — composed from
    them as ``∇L_RL + λ∇L_MTP``, which saves a backward (for ``λ ≥ 0`` the applied term is then
    exactly ``λ·L_MTP``). ``occ-split``: :func:`split_backward`."""
    optimizer.zero_grad(set_to_none=True)
    if out.head_loss is not None:
        if ctx.has("gradients"):
            raise ValueError("occ-split routes its terms by backward passes; a rule that takes the forward's "
                             "gradients (cosine) cannot set its λ")
        split_backward(model, out)
        return
    if not ctx.has("gradients"):
        out.loss.backward()
        return
    params = dict(model.named_parameters())
    for name, (g_rl, g_mtp) in ctx.gradients().items():
        g = torch.zeros_like(params[name]) if g_rl is None else g_rl.clone()
        params[name].grad = g if g_mtp is None else g.add_(g_mtp, alpha=out.coef)


def split_backward(model: nn.Module, out: UpdateLoss) -> None:
    """``occ-split``'s gradient into ``.grad``: on the shared parameters ``∇(L_RL + λ·L_MTP)``
    (``out.loss``), on the MTP-exclusive ones ``∇(c·L_head)`` (``out.head_loss``) — each term
    only where it belongs, so the policy term moves no MTP-exclusive parameter and the head's
    term (its target detached) none of the trunk, embeddings or head. The head's pass goes first
    and keeps the graph; the second frees it, and ``head_loss`` is detached so that nothing of
    the forward stays alive beside the measurements."""
    shared = set(model.shared_parameter_names())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if n not in shared]
    if head:
        out.head_loss.backward(inputs=head, retain_graph=True)
    out.loss.backward(inputs=[p for n, p in named if n in shared])
    out.head_loss = out.head_loss.detach()
