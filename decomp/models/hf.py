"""A DeepSeek-V3-style MTP module attached to a Hugging Face causal LM (docs/method.md §1).

:func:`attach_mtp` wraps a Llama-family causal LM (Llama, Qwen2, SmolLM, Mistral: a decoder with
a list of ``config.num_hidden_layers`` layers and rotary position embeddings) in
:class:`HFMTPModel`, whose ``forward(tokens, detach, with_mtp, attention_mask)`` returns main and
MTP logits exactly like the built-in :class:`~decomp.models.tiny.MTPTransformer`, so every
measurement, regime and the training loop work on it unchanged.

Depth ``k`` at position ``t``: ``z = Block_k(W_k [RMSNorm(h); RMSNorm(Emb(y_{t+k}))])``,
``logits = Head(RMSNorm_k(z))``, predicting ``y_{t+k+1}``. ``h`` is the decoder's output
(after its final norm, as Megatron-LM feeds its MTP layers); ``Emb`` and ``Head`` are the LM's
own input embedding and output head (shared, tied or not). ``Block_k`` is a copy of the LM's
last decoder layer (``init="copy_last"``, default) or a freshly initialised one
(``init="random"``); it runs with the LM's rotary embeddings at the positions of ``h``.

The parts of the LM are found through its config and the standard ``PreTrainedModel``
accessors (``get_decoder``, ``get_input_embeddings``, ``get_output_embeddings``); the decoder
layer list is the ``nn.ModuleList`` of length ``config.num_hidden_layers``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decomp.models.mtp_module import MTPModule
from decomp.regimes import DETACH_MODES
from decomp.rng import seeded_fork

MTP_INITS = ("copy_last", "random")


def _decoder_parts(lm: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """The decoder (base model), its layer list and its rotary embedding module."""
    if not hasattr(lm, "get_decoder") or not hasattr(lm, "config"):
        raise TypeError(f"attach_mtp needs a Hugging Face causal LM, got {type(lm).__name__}")
    decoder = lm.get_decoder()
    n_layers = getattr(lm.config, "num_hidden_layers", None)
    lists = [m for m in decoder.children() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(lists) != 1:
        raise TypeError(
            f"{type(lm).__name__}: cannot find its decoder layers (a ModuleList of config.num_hidden_layers "
            f"= {n_layers} layers)"
        )
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise TypeError(f"{type(lm).__name__}: attach_mtp supports decoders with rotary position embeddings")
    return decoder, lists[0], rotary


def causal_padding_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive ``[B, 1, T, T]`` mask: 0 where query ``i`` may see key ``j`` (``j ≤ i`` and key
    ``j`` not padding), the dtype's minimum elsewhere (finite, so fully padded rows stay finite)."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counting real tokens only (left padding gets position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class HFMTPModel(nn.Module):
    """A Hugging Face causal LM with ``depth`` MTP modules; see the module docstring."""

    def __init__(self, lm: nn.Module, depth: int = 1, init: str = "copy_last", seed: int = 0) -> None:
        super().__init__()
        self.lm = lm
        self.mtp = build_mtp_modules(lm, depth=depth, init=init, seed=seed)
        self.depth = depth
        self.init = init

    @property
    def config(self) -> Any:
        return self.lm.config

    def shared_parameter_names(self) -> list[str]:
        """Names of parameters the main policy depends on (everything outside ``mtp.*``)."""
        return [n for n, _ in self.named_parameters() if not n.startswith("mtp.")]

    def forward(
        self,
        tokens: Tensor,
        detach: str = "none",
        with_mtp: bool = True,
        attention_mask: Tensor | None = None,
        logits_from: int = 0,
    ) -> tuple[Tensor, list[Tensor]]:
        """Main logits ``[B, T − logits_from, V]`` (positions ``logits_from..T−1``: a 49k-token head
        only where it is needed) and MTP logits ``[B, T−k, V]`` (depth ``k`` at position ``t``
        predicts token ``t+k+1``). ``attention_mask`` marks real tokens (left padding allowed)."""
        if detach not in DETACH_MODES:
            raise ValueError(f"detach must be one of {DETACH_MODES}, got {detach!r}")
        with float64_norms(self, self.lm):
            return self._logits(tokens, detach, with_mtp, attention_mask, logits_from)

    def _logits(self, tokens: Tensor, detach: str, with_mtp: bool, attention_mask: Tensor | None,
                logits_from: int) -> tuple[Tensor, list[Tensor]]:
        B, T = tokens.shape
        position_ids = None if attention_mask is None else position_ids_from_mask(attention_mask)
        decoder, _, _ = _decoder_parts(self.lm)
        out = decoder(input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        h = out.last_hidden_state
        main_logits = self.lm.get_output_embeddings()(h[:, logits_from:])
        if not with_mtp:
            return main_logits, []
        if position_ids is None:
            position_ids = torch.arange(T, device=tokens.device).expand(B, T)
        mtp_logits = mtp_logits_from_hidden(self.lm, self.mtp, h, tokens, detach, position_ids, attention_mask)
        return main_logits, mtp_logits


def _rms_norm_in_float64(norm: nn.Module):
    """``norm``'s forward, computed in float64 for a float64 input:
    ``weight · x / sqrt(mean(x²) + variance_epsilon)``, the formula of Llama-family RMSNorms."""
    original = type(norm).forward

    def forward(x: Tensor) -> Tensor:
        if x.dtype != torch.float64:
            return original(norm, x)
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))

    return forward


@contextlib.contextmanager
def norms_in_float64(model: nn.Module) -> Iterator[None]:
    """Within this context the Llama-family RMSNorms of ``model`` (a ``variance_epsilon``
    attribute: Llama, Mistral, Qwen2 and kin) keep a float64 input in float64. Their own forward
    casts every input to float32 (meant for half precision), so a float64 forward — the realized
    changes of :class:`decomp.realized.RealizedGain` — would be float32-limited at each norm;
    other dtypes go to their own forward unchanged. Norms with another formula (Gemma's ``1 + w``)
    are left alone."""
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")
             and "forward" not in vars(m)]  # not already patched by an enclosing context
    for norm in norms:
        norm.forward = _rms_norm_in_float64(norm)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


def float64_norms(model: nn.Module, lm: nn.Module) -> contextlib.AbstractContextManager:
    """:func:`norms_in_float64` of ``model`` when the host ``lm``'s weights are float64 (under
    ``functional_call``: the point evaluated, e.g. a float64 realized change), else nothing."""
    float64 = lm.get_input_embeddings().weight.dtype == torch.float64
    return norms_in_float64(model) if float64 else contextlib.nullcontext()


def build_mtp_modules(lm: nn.Module, depth: int = 1, init: str = "copy_last", seed: int = 0) -> nn.ModuleList:
    """``depth`` MTP modules for the causal LM ``lm`` (module docstring), on its device and dtype.

    ``Block_k`` copies the LM's last decoder layer (``init="copy_last"``) or is re-initialised
    with the host's own scheme (``"random"``); ``W_k`` is ``N(0, initializer_range²)``. The
    random init runs on the CPU generator and on that of the last layer's device, both forked and
    seeded with ``seed`` (:func:`decomp.rng.seeded_fork`): building the modules never moves the
    caller's CPU or CUDA random stream.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if init not in MTP_INITS:
        raise ValueError(f"init must be one of {MTP_INITS}, got {init!r}")
    _, layers, _ = _decoder_parts(lm)
    cfg = lm.config
    hidden = cfg.hidden_size
    eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
    std = float(getattr(cfg, "initializer_range", 0.02))
    modules = []
    # `init="random"` initialises the copied block where it lives (the last layer's device), the
    # rest on the CPU: fork and seed exactly those two generators
    block_device = next(layers[-1].parameters()).device
    with seeded_fork(seed, block_device):
        for _ in range(depth):
            block = copy.deepcopy(layers[-1])
            if init == "random":
                block.apply(lm._init_weights)
            module = MTPModule(hidden, eps, block)
            nn.init.normal_(module.proj.weight, std=std)
            modules.append(module)
    first = next(lm.parameters())
    return nn.ModuleList(modules).to(device=first.device, dtype=first.dtype)


def mtp_states_from_hidden(
    lm: nn.Module,
    modules: nn.ModuleList,
    hidden: Tensor,
    tokens: Tensor,
    detach: str,
    position_ids: Tensor,
    attention_mask: Tensor | None = None,
) -> list[Tensor]:
    """Each depth's normed output state ``RMSNorm_k(z)`` ``[B, T−k, H]`` from the decoder output
    ``hidden`` ``[B, T, H]``: what :func:`mtp_head` turns into logits.

    ``detach`` (docs/method.md §2): ``"all"`` and ``"inputs"`` feed ``h`` and the token embeddings
    through detached copies (``"all"`` also detaches the head, in :func:`mtp_head`); ``"none"``
    detaches nothing. ``position_ids`` ``[B, T]`` are the positions the decoder used for ``hidden``.
    """
    if detach not in DETACH_MODES:
        raise ValueError(f"detach must be one of {DETACH_MODES}, got {detach!r}")
    _, _, rotary = _decoder_parts(lm)
    T = tokens.shape[1]
    embed = lm.get_input_embeddings()
    full_mask = None if attention_mask is None else causal_padding_mask(attention_mask, hidden.dtype)
    state = hidden.detach() if detach in ("inputs", "all") else hidden
    states = []
    for k, module in enumerate(modules, start=1):
        if T - k < 1:
            break
        e = embed(tokens[:, k:])
        if detach in ("inputs", "all"):
            e = e.detach()
        z = module.combine(state[:, : T - k], e)
        pos = position_ids[:, : T - k]
        mask = None if full_mask is None else full_mask[:, :, : T - k, : T - k]
        z = module.block(z, attention_mask=mask, position_ids=pos, position_embeddings=rotary(z, pos))
        z = z[0] if isinstance(z, tuple) else z
        state = z
        states.append(module.out_norm(z))
    return states


def mtp_head(lm: nn.Module, state: Tensor, detach: str) -> Tensor:
    """The LM's own output head on an MTP state (through a detached copy for ``detach="all"``)."""
    head = lm.get_output_embeddings()
    weight = head.weight.detach() if detach == "all" else head.weight
    logits = F.linear(state, weight)
    bias = getattr(head, "bias", None)
    if bias is not None:
        logits = logits + (bias.detach() if detach == "all" else bias)
    return logits


def mtp_logits_from_hidden(
    lm: nn.Module,
    modules: nn.ModuleList,
    hidden: Tensor,
    tokens: Tensor,
    detach: str,
    position_ids: Tensor,
    attention_mask: Tensor | None = None,
) -> list[Tensor]:
    """MTP logits ``[B, T−k, V]`` for each depth ``k`` (:func:`mtp_states_from_hidden`, then
    :func:`mtp_head`)."""
    states = mtp_states_from_hidden(lm, modules, hidden, tokens, detach, position_ids, attention_mask)
    return [mtp_head(lm, s, detach) for s in states]


def attach_mtp(lm: nn.Module, depth: int = 1, init: str = "copy_last", seed: int = 0) -> HFMTPModel:
    """Wrap a Hugging Face causal LM with ``depth`` DeepSeek-V3-style MTP modules."""
    return HFMTPModel(lm, depth=depth, init=init, seed=seed)


def save_mtp(model: HFMTPModel, path: Path | str) -> None:
    """Save the MTP modules' weights (safetensors) with their depth, init and host config."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.mtp.state_dict().items()}
    meta = {"depth": str(model.depth), "init": model.init, "hidden_size": str(model.config.hidden_size),
            "model_type": str(getattr(model.config, "model_type", "?"))}
    save_file(state, str(path), metadata=meta)


def load_mtp(model: HFMTPModel, path: Path | str) -> dict[str, str]:
    """Load weights saved by :func:`save_mtp` into ``model``; a mismatch is a ``ValueError``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("depth") != str(model.depth) or meta.get("hidden_size") != str(model.config.hidden_size):
        raise ValueError(
            f"{path}: MTP weights for depth {meta.get('depth')} / hidden size {meta.get('hidden_size')}, "
            f"the model has depth {model.depth} / hidden size {model.config.hidden_size}"
        )
    state = load_file(str(path), device=str(next(model.parameters()).device))
    missing, unexpected = model.mtp.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing[:3]}, unexpected {unexpected[:3]} MTP weights")
    return meta
