"""The callables :func:`decomp.decomposition.decompose` takes, built from a model and a batch.

Given an :class:`MTPTransformer`-like model (``model(tokens, detach=...) -> (main_logits,
[mtp_logits_k])``), a rollout batch and a regime, :func:`objectives` returns pure functions of a
parameter dict (through ``torch.func.functional_call``):

- ``rl_objective(θ) = J(θ) = Σ M·A·exp(ℓ − ℓ^old) / Σ M`` (docs/method.md §1);
- ``mtp_loss(θ) = L_MTP(θ)``: the regime's MTP loss per unit coefficient, averaged over the ``K``
  MTP depths (the reference scales each head by ``c/K``), computed with the regime's detach mode.
  Given ``coef``, it is the term the regime applies at that coefficient divided by it, so that
  ``coef·L_MTP`` is exactly what training adds (this differs from the unit loss only for the
  ratio-form policy loss at ``coef < 0``, where the reference scales the advantages);
- ``rl_loss(θ)``: given ``clip``, the RL part of the training loss — the clipped surrogate
  ``−J_clip`` plus ``kl_coef·KL`` — whose gradient drives the real update (``None`` otherwise,
  and the update then follows ``−∇J``);
- ``logprob_fn(θ)``: the main head's per-token log-probs ``ℓ`` (for ``jvp`` estimators).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call

from decomp.checks import Params, check_finite, check_mask, check_same_shape
from decomp.rl import (
    LOG_RATIO_CLAMP,
    clipped_policy_loss,
    importance_objective,
    kl_k3,
    masked_mean,
)

if TYPE_CHECKING:  # annotations only: the regimes import the coefficient rules, which import this module
    from decomp.regimes import Regime


@dataclass(frozen=True)
class RolloutBatch:
    """One batch of sampled sequences, on the aligned axis of :func:`aligned_logprobs`.

    ``tokens`` is ``[B, T]`` (prompt + response ids); ``mask``, ``advantages`` and
    ``old_logp`` are ``[B, T−1]``, index ``j`` referring to token ``y_{j+1}``.
    """

    tokens: Tensor  # [B, T] long
    mask: Tensor  # [B, T-1] bool: response tokens
    advantages: Tensor  # [B, T-1]: A_t broadcast over each response
    old_logp: Tensor  # [B, T-1]: main-head log-probs at rollout time
    response_start: int = 0  # aligned index where the response-shaped [B, T_resp] view begins
    attention_mask: Tensor | None = None  # [B, T]: real tokens (left-padded prompts), None: no padding
    groups: Tensor | None = None  # [B] long: each row's prompt group (the independent unit), None: unknown

    def group_rows(self) -> list[Tensor]:
        """The row indices of each prompt group present (in order of first appearance); every row
        its own group when ``groups`` is unknown."""
        if self.groups is None:
            return list(torch.arange(self.tokens.shape[0], device=self.tokens.device).split(1))
        ids, order = [], {}
        for row, g in enumerate(self.groups.tolist()):
            order.setdefault(g, []).append(row)
        for rows in order.values():
            ids.append(torch.tensor(rows, dtype=torch.long, device=self.tokens.device))
        return ids

    def response(self, t: Tensor) -> Tensor:
        """The response-shaped view ``t[:, response_start:]`` of an aligned ``[B, T−1]`` tensor
        (what verl calls response-shaped: the reference proxy averages over all of it)."""
        return t[:, self.response_start :]

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(self.tokens.shape)}")
        B, T = self.tokens.shape
        check_same_shape(mask=self.mask, advantages=self.advantages, old_logp=self.old_logp)
        if tuple(self.mask.shape) != (B, T - 1):
            raise ValueError(f"mask must be [B, T-1] = {(B, T - 1)}, got {tuple(self.mask.shape)}")
        check_mask(self.mask)
        check_finite(self.advantages, "advantages")
        check_finite(self.old_logp, "old_logp")
        if not 0 <= self.response_start < T - 1 or bool(self.mask[:, : self.response_start].any()):
            raise ValueError(f"response_start ({self.response_start}) must leave every response token in the view")
        if self.groups is not None and tuple(self.groups.shape) != (B,):
            raise ValueError(f"groups must be [B] = ({B},), got {tuple(self.groups.shape)}")

    def subset(self, idx: Tensor) -> RolloutBatch:
        """The rows ``idx`` of the batch."""
        return RolloutBatch(
            self.tokens[idx], self.mask[idx], self.advantages[idx], self.old_logp[idx], self.response_start,
            None if self.attention_mask is None else self.attention_mask[idx],
            None if self.groups is None else self.groups[idx],
        )


def vocab_size(model: nn.Module) -> int | None:
    """The number of token ids ``model`` embeds (``None`` when it cannot be told)."""
    for host in (model, getattr(model, "lm", None)):
        if host is not None and hasattr(host, "get_input_embeddings"):
            return int(host.get_input_embeddings().num_embeddings)
    embed = getattr(model, "embed", None)
    return int(embed.num_embeddings) if isinstance(embed, nn.Embedding) else None


def check_eval_batch(model: nn.Module, batch: RolloutBatch, eval_batch: RolloutBatch) -> None:
    """``ValueError`` naming ``eval_batch`` when it cannot stand beside ``batch``: not a
    :class:`RolloutBatch`, on another device, or token ids outside the vocabulary. Its size is
    free (the held-out batch's precision is a setting of its own, independent of the mini-batch)."""
    if not isinstance(eval_batch, RolloutBatch):
        raise ValueError(f"eval_batch must be a RolloutBatch, got {type(eval_batch).__name__}")
    if eval_batch.tokens.device != batch.tokens.device:
        raise ValueError(f"eval_batch is on {eval_batch.tokens.device}, the training batch on {batch.tokens.device}")
    vocab = vocab_size(model)
    low, high = int(eval_batch.tokens.min()), int(eval_batch.tokens.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(f"eval_batch holds token ids in [{low}, {high}], outside the model's vocabulary "
                         f"of {vocab}")


class ImportanceObjective:
    """``J(θ) = Σ M·A·exp(ℓ − ℓ^old) / Σ M`` as a callable of the parameters, with its per-token
    log-probs exposed (:meth:`logprobs`) so that a difference of ``J`` between two points can be
    formed token by token in float64 (:meth:`difference`): ``Σ M·A·r₀·expm1(ℓ₁ − ℓ₀) / Σ M``,
    ``r₀ = exp(ℓ₀ − ℓ^old)``. The sum of differences keeps the resolution that a difference of
    two float32 sums loses (:class:`decomp.realized.RealizedGain` uses it).

    ``rows(idx)``, when given, is the log-prob function of the batch's rows ``idx``: it lets
    :meth:`split` write ``J`` as a sum over row chunks. ``rows_logprobs(params, idx)``, when
    given, is the per-token log-probs ``[len(idx), T−1]`` of the rows ``idx`` as a pure function
    that ``torch.func.vmap`` can batch over ``idx`` (:meth:`rows_value`); ``rows_share_prefix
    (row_sets)``, when given, says whether each set's rows share their positions before the
    response (one prompt's rollouts), which ``rows_logprobs(params, idx, True)`` then runs once.
    ``weight`` scales the value (a chunk's share ``Σ M_c / Σ M``)."""

    def __init__(self, logprob_fn: Callable[[Params], Tensor], old_logp: Tensor, advantages: Tensor,
                 mask: Tensor, *, rows: Callable[[Tensor], Callable[[Params], Tensor]] | None = None,
                 rows_logprobs: Callable[..., Tensor] | None = None, weight: float = 1.0,
                 rows_share_prefix: Callable[[Sequence[Tensor]], bool] | None = None) -> None:
        self.logprobs, self.old_logp, self.advantages, self.mask = logprob_fn, old_logp, advantages, mask.bool()
        self.rows, self.rows_logprobs, self.weight = rows, rows_logprobs, weight
        self.rows_share_prefix = rows_share_prefix

    def __call__(self, params: Params) -> Tensor:
        value = importance_objective(self.logprobs(params), self.old_logp, self.advantages, self.mask)
        return value if self.weight == 1.0 else value * self.weight

    def row_values(self, params: Params) -> Tensor:
        """Each row's contribution to ``J``: ``Σ_t M·A·exp(ℓ − ℓ^old) / Σ M`` (times ``weight``),
        a ``[B]`` vector that sums to ``J(params)``; forward-mode derivatives of it give every
        row's (so every group's) share of a directional derivative in one pass."""
        ratio = torch.exp((self.logprobs(params) - self.old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        m = self.mask.to(ratio.dtype)
        return (self.advantages * ratio * m).sum(1) / m.sum() * self.weight

    def token_weights(self, logp: Tensor) -> Tensor:
        """``w_t = ∂f_r/∂ℓ_t = ∂²f_r/∂ℓ_t²`` at the log-probs ``logp``, float64 ``[B, T−1]``:
        ``M·A·exp(clamp(ℓ − ℓ^old))·1[ℓ − ℓ^old inside the clamp] / Σ M`` (times ``weight``).
        :meth:`row_values`' ``f_r`` reads ``θ`` only through its tokens' ``ℓ_t``, each in one
        exponential, so for tangents ``a``, ``b`` (``ℓ̇_b = ∇ℓ·b``, ``ℓ̈_ab = aᵀ∇²ℓ b``):
        ``∇f_r·b = Σ_t w_t·ℓ̇_b`` and ``aᵀ∇²f_r b = Σ_t w_t·(ℓ̇_a·ℓ̇_b + ℓ̈_ab)`` (the clamp's
        derivative is 1 inside, as torch's, and its second derivative 0)."""
        z = logp.double() - self.old_logp.double()
        inside = (z >= -LOG_RATIO_CLAMP) & (z <= LOG_RATIO_CLAMP)
        m = self.mask.double()
        return m * self.advantages.double() * torch.exp(z.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) * inside \
            / m.sum() * self.weight

    def rows_value(self, params: Params, idx: Tensor, valid: Tensor, one_prefix: bool = False) -> Tensor:
        """The rows ``idx``' share of ``J``, rows with ``valid = 0`` (padding) left out:
        ``Σ_r valid_r·f_r`` over :meth:`row_values`' ``f_r``, from ``rows_logprobs`` alone, so that
        ``torch.func.vmap`` batches it over groups of rows (:mod:`decomp.group_terms`);
        ``one_prefix``: the rows share their prompt (``rows_share_prefix`` said so), run once."""
        if self.rows_logprobs is None:
            raise ValueError("this objective was built without rows_logprobs")
        logp = self.rows_logprobs(params, idx, True) if one_prefix else self.rows_logprobs(params, idx)
        ratio = torch.exp((logp - self.old_logp[idx]).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        m = self.mask[idx].to(ratio.dtype) * valid.to(ratio.dtype)[:, None]
        return (self.advantages[idx] * ratio * m).sum() / self.mask.sum().to(ratio.dtype) * self.weight

    def difference(self, logp: Tensor, base_logp: Tensor) -> float:
        """``J`` at the point of ``logp`` minus ``J`` at the point of ``base_logp`` (float64)."""
        return float(self._token_changes(logp, base_logp).sum() / self.mask.double().sum()) * self.weight

    def _token_changes(self, logp: Tensor, base_logp: Tensor) -> Tensor:
        """``M·A·r₀·expm1(ℓ₁ − ℓ₀)`` per token, in float64."""
        base = base_logp.double()
        log_ratio = (base - self.old_logp.double()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        weight = self.mask.double() * self.advantages.double() * torch.exp(log_ratio)
        # ΔJ's clamp matches importance_objective's for every step a measurement takes
        step = (logp.double() - base).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return weight * torch.expm1(step)

    def split(self, parts: int) -> list[ImportanceObjective]:
        """``J = Σ_c J_c`` over ``parts`` contiguous row chunks, ``J_c = (Σ M_c / Σ M)·J(rows c)``;
        chunks without a response token are left out (their share is 0). ``∇J`` and every
        Hessian-vector product of ``J`` are the sums of the parts' (they are linear in ``J``), so a
        second-order pass can hold one chunk's graph at a time."""
        if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
            raise ValueError(f"parts must be a positive integer, got {parts!r}")
        chunks = torch.arange(self.mask.shape[0], device=self.mask.device).tensor_split(parts)
        return [part for part in self.split_rows(chunks) if part is not None]

    def split_rows(self, row_sets: list[Tensor]) -> list[ImportanceObjective | None]:
        """``J = Σ_s J_s`` over disjoint row sets covering the batch (e.g. its prompt groups),
        ``J_s = (Σ M_s / Σ M)·J(rows s)``: every ``J_s`` keeps the batch's normaliser ``Σ M``, so
        the parts add to ``J`` exactly; ``None`` for a set without a response token (its share is 0)."""
        if self.rows is None:
            raise ValueError("this objective was built without a row factory (rows=) and cannot be split")
        total = int(self.mask.sum())
        out: list[ImportanceObjective | None] = []
        for idx in row_sets:
            mask = self.mask[idx]
            out.append(ImportanceObjective(self.rows(idx), self.old_logp[idx], self.advantages[idx], mask,
                                           weight=self.weight * (int(mask.sum()) / total))  # in float64
                       if bool(mask.any()) else None)
        return out

    def difference_parts(self, logp: Tensor, base_logp: Tensor, row_sets: list[Tensor]) -> list[float]:
        """:meth:`difference` as the contributions of disjoint row sets (each over the batch's
        normaliser ``Σ M``): they add to the whole difference up to float64 rounding."""
        per_row = self._token_changes(logp, base_logp).sum(1)
        total = self.mask.double().sum()
        return [float(per_row[idx].sum() / total) * self.weight for idx in row_sets]


@dataclass(frozen=True)
class Objectives:
    rl_objective: Callable[[Params], Tensor]
    mtp_loss: Callable[[Params], Tensor]
    logprob_fn: Callable[[Params], Tensor]
    rl_loss: Callable[[Params], Tensor] | None = None
    # (L_MTP, rl_loss) from one forward pass, for decomp.updates.step_updates
    first_order: Callable[[Params], tuple[Tensor, Tensor]] | None = None


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(logits)[..., target]`` for each position."""
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def aligned_logprobs(
    main_logits: Tensor, mtp_logits: list[Tensor], tokens: Tensor
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Per-token log-probs aligned on the predicted token.

    Index ``j`` of every returned ``[B, T−1]`` tensor refers to token ``y_{j+1}``:

    - ``logp[:, j] = log π(y_{j+1} | y_{≤j})`` (main head);
    - ``mtp_logp[k−1][:, j]`` = MTP depth ``k``'s log-prob of the *same* token ``y_{j+1}``,
      from its position ``j−k`` (right-shifted as in the reference implementation);
    - ``mtp_valid[k−1][:, j]`` is False for ``j < k`` (no MTP prediction), where
      ``mtp_logp`` is 0.
    """
    logp = token_logprobs(main_logits[:, :-1], tokens[:, 1:])
    return (logp, *aligned_mtp_logprobs(mtp_logits, tokens))


def aligned_mtp_logprobs(mtp_logits: list[Tensor], tokens: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """The MTP half of :func:`aligned_logprobs`: ``(mtp_logp, mtp_valid)`` per depth, without the
    main head's log-softmax (an MTP loss needs none)."""
    B, T = tokens.shape
    mtp_logp, mtp_valid = [], []
    for k, logits in enumerate(mtp_logits, start=1):
        lp = token_logprobs(logits[:, : T - 1 - k], tokens[:, k + 1 :])
        pad = lp.new_zeros(B, k)
        mtp_logp.append(torch.cat([pad, lp], dim=1))
        valid = torch.ones(B, T - 1, dtype=torch.bool, device=tokens.device)
        valid[:, :k] = False
        mtp_valid.append(valid)
    return mtp_logp, mtp_valid


def aligned_distill(main_logits: Tensor, mtp_logits: list[Tensor]) -> list[Tensor]:
    """Per depth ``k``, ``Σ_v p(v)·log q_k(v)`` on the aligned axis: ``p`` the main head's
    *detached* distribution for token ``y_{j+1}`` (position ``j``), ``q_k`` MTP depth ``k``'s for
    the same token (position ``j−k``); 0 where ``j < k`` (as :func:`aligned_logprobs`' ``m``).

    Its negative mean is the soft cross-entropy of the MTP head against the policy's own
    next-token distribution (the ``distill`` regimes): the draft-model objective of speculative
    decoding, which needs no sampled token.
    """
    T = main_logits.shape[1]
    target = torch.softmax(main_logits[:, :-1].detach().float(), dim=-1)
    out = []
    for k, logits in enumerate(mtp_logits, start=1):
        logq = torch.log_softmax(logits[:, : T - 1 - k].float(), dim=-1)
        x = (target[:, k:] * logq).sum(-1).to(logits.dtype)
        out.append(torch.cat([x.new_zeros(x.shape[0], k), x], dim=1))
    return out


def mtp_inputs(regime_input: str, main_logits: Tensor, mtp_logits: list[Tensor], mtp_logp: list[Tensor]) -> list[Tensor]:
    """What a regime's MTP loss reads per depth: ``m`` (``"logp"``) or the distillation term
    of :func:`aligned_distill` (``"distill"``)."""
    return aligned_distill(main_logits, mtp_logits) if regime_input == "distill" else mtp_logp


def model_logprobs(
    model: nn.Module,
    params: Params,
    tokens: Tensor,
    detach: str = "none",
    attention_mask: Tensor | None = None,
    with_mtp: bool = True,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``aligned_logprobs`` of ``model`` evaluated at ``params`` (a functional call).

    ``with_mtp=False`` skips the MTP module (empty MTP lists): ``J`` and ``ℓ`` need only the
    main head, and the MTP block and its vocabulary-sized head are a quarter of a small LM's
    forward pass — and of every HVP through ``J``.
    """
    kwargs: dict = {"detach": detach}
    if not with_mtp:
        kwargs["with_mtp"] = False
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    main_logits, mtp_logits = functional_call(model, params, (tokens,), kwargs)
    return aligned_logprobs(main_logits, mtp_logits, tokens)


def accepts_logits_from(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_from`` (the main head from that position on)."""
    return "logits_from" in inspect.signature(model.forward).parameters


def accepts_shared_prefix(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``shared_prefix`` (:class:`decomp.models.tiny.MTPTransformer`)."""
    return "shared_prefix" in inspect.signature(model.forward).parameters


# share the positions before the response only where the distinct prefixes are at most this
# fraction of the rows (fewer shared rows save less than the prefix pass's own launches)
SHARED_PREFIX_MAX_FRACTION = 0.5


def shared_prefix(tokens: Tensor, start: int) -> tuple[Tensor, Tensor] | None:
    """``(rows, owner)`` for a model's ``shared_prefix``: one row per distinct ``tokens[:, :start]``
    (its first occurrence) and each row's index among them; ``None`` where the distinct prefixes
    exceed :data:`SHARED_PREFIX_MAX_FRACTION` of the rows."""
    if start <= 0:
        return None
    unique, owner = torch.unique(tokens[:, :start], dim=0, return_inverse=True)
    if unique.shape[0] > SHARED_PREFIX_MAX_FRACTION * tokens.shape[0]:
        return None
    index = torch.arange(tokens.shape[0], device=tokens.device)
    rows = torch.full((unique.shape[0],), tokens.shape[0], device=tokens.device, dtype=torch.long)
    return rows.scatter_reduce(0, owner, index, reduce="amin"), owner


def aligned_main_logprobs(main_logits: Tensor, tokens: Tensor, start: int = 0) -> Tensor:
    """The main head's aligned log-probs ``[B, T−1]`` from logits of positions ``start..T−1``
    (index ``j`` is token ``y_{j+1}``); 0 before ``start``."""
    lp = token_logprobs(main_logits[:, :-1], tokens[:, start + 1 :])
    return lp if start == 0 else torch.cat([lp.new_zeros(lp.shape[0], start), lp], dim=1)


class _BatchFunctions:
    """The pure functions of one batch behind :func:`objectives` (each a method, so each is short)."""

    def __init__(self, model: nn.Module, batch: RolloutBatch, regime: Regime, coef: float | None,
                 loss_of_logp: Callable[[Tensor], Tensor] | None) -> None:
        self.model, self.batch, self.regime, self.coef, self.loss_of_logp = model, batch, regime, coef, loss_of_logp
        self.mask = batch.mask.bool()
        # J and ℓ read the main head on response positions only (aligned index ≥ response_start):
        # elsewhere the mask is 0, and the vocabulary-sized head is a large part of an LM's pass
        self.start = batch.response_start if accepts_logits_from(model) else 0
        # ℓ's forward runs the positions before the response once per distinct prompt, where the
        # model can (the rollouts of one prompt share them): the same log-probs, fewer positions
        self.can_share_prefix = bool(self.start and batch.attention_mask is None and accepts_shared_prefix(model))
        self.prefix = shared_prefix(batch.tokens, self.start) if self.can_share_prefix else None

    def forward(self, params: Params, detach: str, with_mtp: bool, start: int,
                prefix: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        kwargs: dict = {"detach": detach, "with_mtp": with_mtp}
        if self.batch.attention_mask is not None:
            kwargs["attention_mask"] = self.batch.attention_mask
        if start:
            kwargs["logits_from"] = start
        if prefix is not None:
            kwargs["shared_prefix"] = prefix
        return functional_call(self.model, params, (self.batch.tokens,), kwargs)

    def main_start(self) -> int:
        """Where the main head must start for an MTP loss: position 0 for a regime that reads the
        main head's distribution (``distill``), else the response (the RL loss reads no more)."""
        return 0 if self.regime.mtp_input == "distill" else self.start

    def mtp_loss_of(self, main_logits: Tensor, mtp_logits: list[Tensor]) -> Tensor:
        """``main_logits`` from position 0 for a ``distill`` regime; unused otherwise."""
        b, regime = self.batch, self.regime
        mtp_logp, valid = aligned_mtp_logprobs(mtp_logits, b.tokens)
        if not mtp_logp:
            raise ValueError("the model has no MTP module (mtp_depth = 0)")
        mtp_logp = mtp_inputs(regime.mtp_input, main_logits, mtp_logits, mtp_logp)
        losses = [
            regime.unit_loss(m, b.old_logp, b.advantages, self.mask & v) if self.coef is None
            else regime.applied_unit_loss(self.coef, m, b.old_logp, b.advantages, self.mask & v)
            for m, v in zip(mtp_logp, valid, strict=True)
        ]
        return torch.stack(losses).mean()

    def mtp_loss(self, params: Params) -> Tensor:
        return self.mtp_loss_of(*self.forward(params, self.regime.detach, True, self.main_start()))

    def logprob_fn(self, params: Params) -> Tensor:
        main_logits, _ = self.forward(params, "none", False, self.start, self.prefix)
        return aligned_main_logprobs(main_logits, self.batch.tokens, self.start)

    def rows_logprobs(self, params: Params, idx: Tensor, one_prefix: bool = False) -> Tensor:
        """:meth:`logprob_fn` of the rows ``idx`` alone, with no check on their values (a
        ``torch.func.vmap`` over groups of rows runs it: no data-dependent branch); ``one_prefix``:
        the rows share their positions before the response (:meth:`rows_share_prefix`), run once."""
        tokens = self.batch.tokens[idx]
        kwargs: dict = {"detach": "none", "with_mtp": False}
        if self.batch.attention_mask is not None:
            kwargs["attention_mask"] = self.batch.attention_mask[idx]
        if self.start:
            kwargs["logits_from"] = self.start
        if one_prefix:
            kwargs["shared_prefix"] = (idx.new_zeros(1), idx.new_zeros(idx.shape[0]))
        main_logits, _ = functional_call(self.model, params, (tokens,), kwargs)
        return aligned_main_logprobs(main_logits, tokens, self.start)

    def rows_share_prefix(self, row_sets: Sequence[Tensor]) -> bool:
        """Whether the model can run each set's positions before the response once: it takes
        ``shared_prefix``, and every set's rows have equal tokens there (one prompt's rollouts)."""
        if not self.can_share_prefix:
            return False
        head = self.batch.tokens[:, :self.start]
        return all(len(r) == 0 or bool((head[r] == head[r[:1]]).all()) for r in row_sets)

    def rl_loss(self, params: Params) -> Tensor:
        return self.loss_of_logp(self.logprob_fn(params))

    def first_order(self, params: Params) -> tuple[Tensor, Tensor]:
        start = self.main_start()
        main_logits, mtp_logits = self.forward(params, self.regime.detach, True, start)
        logp = aligned_main_logprobs(main_logits, self.batch.tokens, start)
        return self.mtp_loss_of(main_logits, mtp_logits), self.loss_of_logp(logp)


def clipped_rl_loss(batch: RolloutBatch, clip: tuple[float, float], kl_coef: float = 0.0,
                    ref_logp: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """The built-in training RL loss as a function of ``ℓ``: the clipped surrogate plus
    ``kl_coef``·k3 KL to ``ref_logp``."""
    mask = batch.mask.bool()

    def loss(logp: Tensor) -> Tensor:
        value = clipped_policy_loss(logp, batch.old_logp, batch.advantages, mask, *clip)
        if kl_coef:
            value = value + kl_coef * masked_mean(kl_k3(logp, ref_logp), mask)
        return value

    return loss


def objectives(
    model: nn.Module,
    batch: RolloutBatch,
    regime: Regime,
    *,
    coef: float | None = None,
    clip: tuple[float, float] | None = None,
    kl_coef: float = 0.0,
    ref_logp: Tensor | None = None,
    rl_loss_of_logp: Callable[[Tensor], Tensor] | None = None,
) -> Objectives:
    """``J``, ``L_MTP`` (for ``regime``, at ``coef``), ``ℓ`` and the training RL loss as
    functions of a parameter dict (see the module docstring).

    ``rl_loss_of_logp`` replaces the built-in training RL loss (``clip``, ``kl_coef``) by a
    trainer's own, as a function of the aligned main log-probs ``ℓ`` ``[B, T−1]`` (e.g. TRL's
    loss types and normalisations, :mod:`decomp.integrations.trl`).
    """
    if kl_coef and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")
    if rl_loss_of_logp is not None and (clip is not None or kl_coef):
        raise ValueError("give either rl_loss_of_logp or clip/kl_coef, not both")
    if rl_loss_of_logp is None and clip is not None:
        rl_loss_of_logp = clipped_rl_loss(batch, clip, kl_coef, ref_logp)
    f = _BatchFunctions(model, batch, regime, coef, rl_loss_of_logp)
    rl_objective = ImportanceObjective(
        f.logprob_fn, batch.old_logp, batch.advantages, f.mask,
        rows=lambda idx: _BatchFunctions(model, batch.subset(idx), regime, coef, None).logprob_fn,
        rows_logprobs=f.rows_logprobs, rows_share_prefix=f.rows_share_prefix)
    if rl_loss_of_logp is None:
        return Objectives(rl_objective, f.mtp_loss, f.logprob_fn)
    return Objectives(rl_objective, f.mtp_loss, f.logprob_fn, f.rl_loss, f.first_order)
