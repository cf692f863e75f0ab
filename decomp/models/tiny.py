"""A tiny decoder-only transformer with a DeepSeek-V3-style MTP module (docs/method.md §1).

Main model: token + learned position embeddings, ``n_layers`` pre-norm blocks (RMSNorm, causal
``scaled_dot_product_attention``, GELU MLP), final RMSNorm, output head. Logits at position
``t`` predict token ``t+1``.

MTP module of depth ``k`` (``k = 1..K``): at position ``t`` it combines the previous state
(the trunk output ``h_t`` for ``k = 1``, depth ``k−1``'s output otherwise) with the embedding of
token ``t+k`` and predicts token ``t+k+1``::

    z = Block_k(W_k [RMSNorm(h); RMSNorm(Emb(y_{t+k}))]),   logits = Head(RMSNorm_k(z))

The two input norms, ``W_k``, ``Block_k`` and ``RMSNorm_k`` belong to the MTP module; ``Emb``
and ``Head`` are the main model's (shared). Detach modes (docs/method.md §2):

- ``"none"``: gradients of MTP losses reach every parameter;
- ``"inputs"``: the trunk state and the token embeddings entering the MTP module are detached;
  the shared head still receives the MTP gradient (the reference patch's ``detach_encoder``);
- ``"all"``: as ``"inputs"`` and the head is used through a detached copy of its weight, so
  only MTP-exclusive parameters receive the MTP gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decomp.models.mtp_module import MTPModule
from decomp.regimes import DETACH_MODES


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of :class:`MTPTransformer` (defaults: the built-in tiny model)."""

    vocab_size: int = 16  # number of token ids
    max_len: int = 32  # longest sequence (learned positions)
    d_model: int = 64  # residual width
    n_layers: int = 2  # main transformer blocks
    n_heads: int = 4  # attention heads per block
    d_mlp: int = 256  # MLP hidden width
    mtp_depth: int = 1  # number of MTP modules K (depth k predicts token t+k+1)
    norm_eps: float = 1e-6  # RMSNorm epsilon

    def __post_init__(self) -> None:
        for field in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "d_mlp"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.mtp_depth < 0:
            raise ValueError(f"mtp_depth must be >= 0, got {self.mtp_depth}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        return tuple(t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))

    def _merge(self, y: Tensor) -> Tensor:
        B, _, T, d = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_heads * d))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._heads(x)
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def with_prefix(self, prefix: Tensor, rest: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`forward` of rows whose first ``P`` positions are ``prefix[owner]`` (``[G, P, D]``,
        computed once per distinct prefix) and the rest ``rest`` (``[B, S, D]``): the rest's queries
        attend to their prefix's keys and values, then causally to their own."""
        q, k, v = self._heads(prefix)
        y_prefix = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        q_r, k_r, v_r = self._heads(rest)
        P, S = prefix.shape[1], rest.shape[1]
        keys, values = torch.cat([k[owner], k_r], dim=2), torch.cat([v[owner], v_r], dim=2)
        mask = torch.ones(S, P + S, dtype=torch.bool, device=rest.device).tril(P)  # position P+i sees ≤ P+i
        y_rest = F.scaled_dot_product_attention(q_r, keys, values, attn_mask=mask)
        return self._merge(y_prefix), self._merge(y_rest)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))

    def with_prefix(self, prefix: Tensor, rest: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`forward` of ``prefix[owner]`` followed by ``rest`` (:meth:`Attention.with_prefix`)."""
        a_prefix, a_rest = self.attn.with_prefix(self.attn_norm(prefix), self.attn_norm(rest), owner)
        prefix, rest = prefix + a_prefix, rest + a_rest
        return prefix + self.mlp(self.mlp_norm(prefix)), rest + self.mlp(self.mlp_norm(rest))


class MTPTransformer(nn.Module):
    """Decoder-only transformer returning main logits and one logits tensor per MTP depth."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg.d_model, cfg.norm_eps, Block(cfg)) for _ in range(cfg.mtp_depth))
        self.apply(self._init)

    def _with_prefix(self, x: Tensor, start: int, rows: Tensor, owner: Tensor, with_mtp: bool) -> Tensor:
        """The main logits of positions ``start..`` with the positions before ``start`` run once per
        distinct prefix (:meth:`forward`'s ``shared_prefix``)."""
        if with_mtp or not 0 < start < x.shape[1]:
            raise ValueError("shared_prefix needs with_mtp=False and 0 < logits_from < the sequence length")
        prefix, rest = x[rows, :start], x[:, start:]
        for block in self.blocks:
            prefix, rest = block.with_prefix(prefix, rest, owner)
        return self.head(self.final_norm(rest))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def shared_parameter_names(self) -> list[str]:
        """Names of parameters the main policy depends on (everything outside ``mtp.*``)."""
        return [n for n, _ in self.named_parameters() if not n.startswith("mtp.")]

    def forward(
        self, tokens: Tensor, detach: str = "none", with_mtp: bool = True, attention_mask: Tensor | None = None,
        logits_from: int = 0, shared_prefix: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Main logits ``[B, T − logits_from, V]`` (positions ``logits_from..T−1``: the head only
        where it is needed) and MTP logits ``[B, T−k, V]`` for ``k = 1..K``.

        MTP depth ``k`` logits at position ``t`` predict token ``t+k+1``. ``with_mtp=False``
        skips the MTP module (sampling needs only the main head) and returns an empty list.
        The built-in tasks never pad, so ``attention_mask`` must be ``None`` (or all ones).

        ``shared_prefix = (rows, owner)`` (``with_mtp=False`` only): row ``r``'s tokens before
        ``logits_from`` equal those of row ``rows[owner[r]]`` (e.g. the rollouts of one prompt),
        so the trunk runs those positions once per distinct prefix and the rest of every row
        attends to its prefix's keys and values: the same logits, fewer positions computed.
        """
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("the built-in model does not support padding (attention_mask with zeros)")
        if detach not in DETACH_MODES:
            raise ValueError(f"detach must be one of {DETACH_MODES}, got {detach!r}")
        B, T = tokens.shape
        if T > self.cfg.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len {self.cfg.max_len}")
        x = self.embed(tokens) + self.pos(torch.arange(T, device=tokens.device))
        if shared_prefix is not None:
            return self._with_prefix(x, logits_from, *shared_prefix, with_mtp), []
        for block in self.blocks:
            x = block(x)
        main_logits = self.head(self.final_norm(x[:, logits_from:]))
        if not with_mtp:
            return main_logits, []

        head_weight = self.head.weight.detach() if detach == "all" else self.head.weight
        embed_weight = self.embed.weight.detach() if detach in ("inputs", "all") else self.embed.weight
        state = x.detach() if detach in ("inputs", "all") else x
        mtp_logits = []
        for k, module in enumerate(self.mtp, start=1):
            if T - k < 1:
                break
            # depth k at position t sees token t+k; the chain of MTP states stays live.
            next_embed = F.embedding(tokens[:, k:], embed_weight)
            state = module.block(module.combine(state[:, : T - k], next_embed))
            mtp_logits.append(F.linear(module.out_norm(state), head_weight))
        return main_logits, mtp_logits
