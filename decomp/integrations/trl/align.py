"""TRL's tensors on decomp's axes, and the model as decomp sees it inside TRL.

Token alignment. TRL scores completion token ``j`` (absolute position ``P + j`` after a prompt
of ``P`` tokens) with the main head at position ``P + j − 1``; MTP depth ``k`` predicts the same
token from position ``P + j − k − 1`` (docs/method.md, §1), so ``m``, ``ℓ``, ``ℓ^old``, ``A`` and
the mask are all ``[B, C]`` completion-shaped tensors. Depth ``k`` has no prediction for the first
``k − P + 1`` completion tokens when the prompt is shorter than ``k + 1`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from decomp.models.hf import (
    _decoder_parts,
    build_mtp_modules,
    float64_norms,
    mtp_head,
    mtp_logits_from_hidden,
    mtp_states_from_hidden,
)
from decomp.objectives import RolloutBatch, token_logprobs
from decomp.regimes import DETACH_MODES

MTP_ATTR = "decomp_mtp"  # the LM submodule holding the MTP modules


def add_mtp(lm: nn.Module, depth: int = 1, init: str = "copy_last", seed: int = 0) -> nn.ModuleList:
    """Attach ``depth`` MTP modules (:func:`decomp.models.hf.build_mtp_modules`) to the causal LM as
    ``lm.decomp_mtp``; an LM that already has them (e.g. loaded warm) is left as it is."""
    existing = getattr(lm, MTP_ATTR, None)
    if existing is not None:
        return existing
    modules = build_mtp_modules(lm, depth=depth, init=init, seed=seed)
    lm.add_module(MTP_ATTR, modules)
    return modules


class MTPModelView(nn.Module):
    """The trainer's LM as a decomp model: ``forward(tokens, detach, with_mtp, attention_mask)``
    returns main and MTP logits (divided by ``temperature``) exactly as TRL's forward sees them —
    the decoder called with ``input_ids`` and ``attention_mask`` only, positions ``0..T−1``.

    It owns no parameters of its own: ``named_parameters()`` are the LM's (prefixed ``lm.``),
    so a ``functional_call`` on the view is one on the trained model.
    """

    def __init__(self, lm: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        if getattr(lm, MTP_ATTR, None) is None:
            raise ValueError("the model has no MTP modules: call add_mtp(lm) first")
        self.lm = lm
        self.temperature = float(temperature)

    def shared_parameter_names(self) -> list[str]:
        """Names of the parameters the policy depends on (everything outside the MTP modules)."""
        return [n for n, _ in self.named_parameters() if not n.startswith(f"lm.{MTP_ATTR}.")]

    def forward(
        self, tokens: Tensor, detach: str = "none", with_mtp: bool = True, attention_mask: Tensor | None = None,
        logits_from: int = 0,
    ) -> tuple[Tensor, list[Tensor]]:
        if detach not in DETACH_MODES:
            raise ValueError(f"detach must be one of {DETACH_MODES}, got {detach!r}")
        with float64_norms(self, self.lm):  # a float64 evaluation stays float64
            decoder, _, _ = _decoder_parts(self.lm)
            h = decoder(input_ids=tokens, attention_mask=attention_mask, use_cache=False).last_hidden_state
            main = self.lm.get_output_embeddings()(h[:, logits_from:]) / self.temperature
            if not with_mtp:
                return main, []
            B, T = tokens.shape
            positions = torch.arange(T, device=tokens.device).expand(B, T)
            mtp = mtp_logits_from_hidden(self.lm, getattr(self.lm, MTP_ATTR), h, tokens, detach, positions,
                                         attention_mask)
        return main, [x / self.temperature for x in mtp]


def completion_mtp_logprobs(
    lm: nn.Module,
    hidden: Tensor,
    inputs: dict[str, Any],
    detach: str,
    temperature: float = 1.0,
) -> tuple[list[Tensor], list[Tensor]]:
    """Each MTP depth's log-prob of every completion token, ``[B, C]``, and where it exists.

    ``hidden`` ``[B, P+C, H]`` is the decoder output on ``prompt_ids ++ completion_ids``.
    Depth ``k`` predicts token ``P + j`` from position ``P + j − k − 1``; positions before the
    sequence start have no prediction (log-prob 0, valid ``False``).
    """
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    tokens = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    B, T = tokens.shape
    P, C = prompt_ids.shape[1], completion_ids.shape[1]
    positions = torch.arange(T, device=tokens.device).expand(B, T)
    states = mtp_states_from_hidden(lm, getattr(lm, MTP_ATTR), hidden, tokens, detach, positions, attention_mask)
    logps, valids = [], []
    for k, state in enumerate(states, start=1):
        start = max(P - k - 1, 0)  # the first position predicting a completion token
        # the head only where it predicts completion tokens: prompt positions would cost [B, P, V]
        logits = mtp_head(lm, state[:, start : T - k - 1], detach)
        lp = token_logprobs(logits / temperature, tokens[:, start + k + 1 :])
        missing = C - lp.shape[1]  # completion tokens with no depth-k prediction
        logps.append(torch.cat([lp.new_zeros(B, missing), lp], dim=1))
        valid = torch.ones(B, C, dtype=torch.bool, device=tokens.device)
        valid[:, :missing] = False
        valids.append(valid)
    return logps, valids


def completion_mask(inputs: dict[str, Any]) -> Tensor:
    """TRL's loss mask: completion tokens, times the tool mask where tools ran."""
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    return mask.bool()


def completion_advantages(inputs: dict[str, Any], like: Tensor) -> Tensor:
    adv = inputs["advantages"]
    return (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand_as(like).to(like.dtype)


def rollout_batch(inputs: dict[str, Any], current_logp: Tensor | None = None) -> RolloutBatch:
    """TRL's micro-batch on decomp's aligned axis (:class:`~decomp.objectives.RolloutBatch`).

    ``ℓ^old`` is TRL's ``old_per_token_logps``, or ``current_logp`` where TRL has none (one
    update per generation: the sampling policy is the current one).
    """
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    P = prompt_ids.shape[1]
    if P < 1:
        raise ValueError("the decomposition needs at least one prompt token")
    old = inputs.get("old_per_token_logps")
    if old is None:
        if current_logp is None:
            raise ValueError("inputs have no old_per_token_logps: pass current_logp")
        old = current_logp
    old = old.detach()
    mask = completion_mask(inputs)
    B = mask.shape[0]
    pad = P - 1

    def aligned(x: Tensor) -> Tensor:
        return torch.cat([x.new_zeros(B, pad), x], dim=1)

    return RolloutBatch(
        tokens=torch.cat([prompt_ids, completion_ids], dim=1),
        mask=aligned(mask),
        advantages=aligned(completion_advantages(inputs, old)),
        old_logp=aligned(old),
        response_start=pad,
        attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
    )


@contextmanager
def plain_forward(lm: nn.Module) -> Iterator[None]:
    """The LM in eval mode (docs/engineering.md §7: no dropout in measurements), without activation
    checkpointing and without the input-embedding ``requires_grad_`` hook that the Trainer adds
    for checkpointing — neither works inside ``torch.func`` transforms; all restored after."""
    was_training = lm.training
    embed = lm.get_input_embeddings()
    # Trainer may have added the hook more than once; transformers tracks only the last one
    hooks = {k: h for k, h in embed._forward_hooks.items() if getattr(h, "__name__", "") == "make_inputs_require_grads"}
    checkpointed = [m for m in lm.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for k in hooks:
        del embed._forward_hooks[k]
    for m in checkpointed:
        m.gradient_checkpointing = False
    lm.eval()
    try:
        yield
    finally:
        lm.train(was_training)
        for m in checkpointed:
            m.gradient_checkpointing = True
        embed._forward_hooks.update(hooks)


class HiddenCapture:
    """Records the decoder's ``last_hidden_state`` while active (a forward hook)."""

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder
        self.states: list[Tensor] = []
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.states.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    def __enter__(self) -> HiddenCapture:
        self._handle = self.decoder.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def hidden(self) -> Tensor:
        if not self.states:
            raise RuntimeError("TRL's forward did not run the decoder: cannot compute the MTP term")
        return self.states[0] if len(self.states) == 1 else torch.cat(self.states, dim=0)
