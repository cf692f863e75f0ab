"""What a TRL run measures by default: on a real LM each record costs many training steps, so the
defaults measure first what a user needs first.

On SmolLM2-135M on a CPU an instrumented step of all four directions on both splits took 998 s
(8 records of 103–151 s, 44–115 s of each the search) beside a 13.6 s training step (the cost
issue's run of ``examples/trl_grpo.py``). :func:`hf_instrument_config` measures the ``active``
direction only (the shadow directions ``ce``, ``policy``, ``distill-joint`` are opt-in: each adds
about what the active one costs) and, with held-out prompts, searches the realized optimum ``λ̂``
on the held-out split only (the ground truth; the in-sample ``train`` record keeps its terms and
``λ*``, without ``λ̂``). docs/trl.md states each option's cost.
"""

from __future__ import annotations

from typing import Any

from decomp.config import InstrumentConfig
from decomp.vocabulary import DIRECTIONS

HF_DIRECTIONS = "active"  # the shadow directions are opt-in for a Hugging Face model


def hf_instrument_config(decomp_every: int = 5, *, heldout: bool = False, shadow: bool = False,
                         **fields: Any) -> InstrumentConfig:
    """An :class:`~decomp.config.InstrumentConfig` with the defaults for a Hugging Face model.

    Args:
        decomp_every: optimizer steps between instrumented steps.
        heldout: whether the trainer gets ``heldout_prompts`` (the held-out split): then the search
            for ``λ̂`` runs on the ``heldout`` split only (``search_splits="heldout"``), else on
            ``train``.
        shadow: also measure the shadow directions (``decomp_directions`` = every direction);
            default: the ``active`` direction only.
        **fields: any other ``InstrumentConfig`` field, which wins over these defaults (e.g.
            ``decomp_directions="active,ce"``, ``search_splits="train,heldout"``, ``search=False``).

    Returns:
        The validated config.
    """
    defaults: dict[str, Any] = {
        "decomp_every": decomp_every,
        "decomp_directions": ",".join(DIRECTIONS) if shadow else HF_DIRECTIONS,
        "heldout": heldout,
        "search_splits": "heldout" if heldout else "train",
    }
    config = InstrumentConfig(**{**defaults, **fields})
    config.validate()
    return config
