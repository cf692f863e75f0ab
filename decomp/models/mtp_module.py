"""One MTP depth, shared by the built-in model and Hugging Face hosts (DeepSeek-V3 style).

At position ``t`` depth ``k`` combines the previous state ``h`` (the trunk's for ``k = 1``) with
the embedding ``e`` of token ``t+k``::

    z = Block_k(W_k [RMSNorm(h); RMSNorm(e)]),   logits = Head(RMSNorm_k(z))

The two input norms, ``W_k`` (``proj``), ``Block_k`` and ``RMSNorm_k`` (``out_norm``) belong to the
module; ``Emb`` and ``Head`` are the host's. The host calls ``block`` itself, since a Hugging Face
decoder layer needs the host's attention mask and rotary embeddings.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MTPModule(nn.Module):
    """Norms, projection and block of one MTP depth (module docstring)."""

    def __init__(self, hidden: int, eps: float, block: nn.Module) -> None:
        super().__init__()
        self.state_norm = nn.RMSNorm(hidden, eps=eps)
        self.embed_norm = nn.RMSNorm(hidden, eps=eps)
        self.proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.block = block
        self.out_norm = nn.RMSNorm(hidden, eps=eps)

    def combine(self, state: Tensor, next_embed: Tensor) -> Tensor:
        """``W [RMSNorm(h); RMSNorm(e)]``: the block's input."""
        return self.proj(torch.cat([self.state_norm(state), self.embed_norm(next_embed)], dim=-1))
