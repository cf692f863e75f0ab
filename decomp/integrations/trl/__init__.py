"""MTP regimes, OCC and the exact decomposition inside TRL's ``GRPOTrainer``.

:class:`MTPGRPOTrainer` is a ``GRPOTrainer`` whose loss gains the MTP term of docs/method.md §2,

    loss = TRL's GRPO loss + λ·L_MTP / gradient_accumulation_steps,

computed from the decoder states of TRL's own forward pass (captured by a forward hook, so the
MTP term costs one MTP block and head, not a second trunk pass), on TRL's completion tensors,
with TRL's old log-probs ``ℓ^old`` and advantages. The MTP modules are attached to the causal
LM as the submodule ``decomp_mtp`` (:func:`add_mtp`), so TRL's optimizer, accelerate's DDP
wrapper and ``save_model`` all see them. The MTP policy loss (``policy``, ``occ``) is the
PPO-clipped surrogate with TRL's ``epsilon``/``epsilon_high`` (TRL's ``delta`` is not applied to
it); with ``K > 1`` depths the applied term is the mean of the depths' ``λ_k·L_k`` and the
logged ``λ`` their mean.

Token alignment (:mod:`~decomp.integrations.trl.align`). TRL scores completion token ``j`` (absolute position ``P + j`` after a prompt
of ``P`` tokens) with the main head at position ``P + j − 1``; MTP depth ``k`` predicts the same
token from position ``P + j − k − 1`` (docs/method.md §1), so ``m``, ``ℓ``, ``ℓ^old``, ``A`` and the
mask are all ``[B, C]`` completion-shaped tensors. Depth ``k`` has no prediction for the first
``k − P + 1`` completion tokens when the prompt is shorter than ``k + 1`` tokens.

OCC needs the current policy to differ from the sampling one. TRL keeps ``ℓ^old`` only when
some updates of a generation batch come after an optimizer step, i.e. when
``gradient_accumulation_steps`` is not a multiple of ``steps_per_generation × num_iterations``
(e.g. ``num_iterations = 2`` with the defaults); otherwise ``ℓ = ℓ^old`` at every update, every
proxy is 0 and a warning says so. The proxy's sums (:func:`decomp.occ.proxy_statistics`) are
all-reduced across processes, so every rank applies the same global ``λ``.

:class:`DecompositionCallback` (installed by the trainer) writes a decomp run directory into
``output_dir``: ``decomp_run.json``, ``metrics.jsonl`` (one record per optimizer step: the
applied ``λ``, ``L_MTP``, the mean reward) and, every ``decomp_every`` steps, the exact
decomposition of the coming optimizer step for the ``active``, ``ce`` and ``policy`` directions
(:func:`decomp.instrument.instrument_update`) in ``decomposition.jsonl``: one record per
direction and *split*. The updates (``u_RL``, ``δ``) are built once from the training
micro-batch; ``J``'s side is evaluated on ``train`` (that micro-batch: in-sample) and, when the
trainer is given ``heldout_prompts`` (and ``InstrumentConfig.heldout``), on ``heldout``: a fresh
micro-batch of the same size sampled from the current policy on those prompts, scored by the
trainer's reward functions with TRL's group-normalised advantages, ``ℓ^old`` the current
log-probs (:mod:`~decomp.integrations.trl.heldout`). It is built on the main process without
TRL's generation pipeline (no collective, no TRL metric) under its own seeded RNG, so training is
bit-identical with and without it. With ``InstrumentConfig.search`` (the default) every record
also holds the realized optimum ``λ̂`` (forward passes only). The records are also logged
through the trainer's logger as ``decomp/<field>`` (``decomp/<direction>/<field>`` for the
shadow directions, ``.../heldout/<field>`` for the held-out split), so they reach TensorBoard or
Weights & Biases. ``decomp plot``, ``validate`` and ``report`` read that directory (and prefer
the held-out split where a run has one). A progress bar advances over the records of each
instrumented step (off with ``disable_tqdm``). On a real LM each record costs many training
steps: :func:`~decomp.integrations.trl.defaults.hf_instrument_config` gives the defaults that
measure first what a user needs first (the ``active`` direction, its ``λ̂`` on the held-out split;
the shadow directions opt-in).

What the decomposition measures: the step the optimizer is about to take, modelled on the last
micro-batch of the step (with ``gradient_accumulation_steps = 1``, TRL's default, that *is* the
step), with TRL's own RL loss (:func:`trl_rl_loss`: its loss type, clipping, KL and
normalisation) driving ``u_RL``, the live optimizer state and learning rate. Global-norm
gradient clipping is not modelled; each record says whether it was active (``grad_clipped``).

Multi-GPU (accelerate DDP): every rank computes the MTP term on its own micro-batch and DDP
averages the gradients (the trainer sets ``ddp_find_unused_parameters=False``: the MTP term runs
outside DDP's forward); the OCC sums are all-reduced, while ``mtp/loss`` is each rank's own. The
decomposition runs on the main process only, on its own micro-batch (and its own held-out
batch), with its local (not all-reduced) gradients and the replicated optimizer state — a
one-rank sample of the step, not the averaged step — while the other ranks wait at their next
collective. Sharded parameters
(FSDP, DeepSpeed ZeRO-3) are refused by the trainer, sharded optimizer state (any DeepSpeed
stage) by the decomposition; models whose head applies logit transforms (soft-capping, logit
scales: Gemma 2, Granite, Cohere) are refused, since TRL's fused head applies them.

Modules, one concern each: :mod:`~decomp.integrations.trl.trainer` (the trainer and the MTP
term), :mod:`~decomp.integrations.trl.callback` (the run directory and the decomposition),
:mod:`~decomp.integrations.trl.loss` (TRL's loss as a function of the log-probs),
:mod:`~decomp.integrations.trl.heldout` (the held-out micro-batch),
:mod:`~decomp.integrations.trl.align` (TRL's tensors on decomp's axes) and
:mod:`~decomp.integrations.trl.support` (the tested range and what is refused).
"""

from __future__ import annotations

try:
    import trl  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"decomp.integrations.trl needs TRL: pip install 'decomp[trl]' ({err})") from None

from decomp.config import InstrumentConfig, MTPConfig
from decomp.integrations.trl.align import (
    MTP_ATTR,
    MTPModelView,
    add_mtp,
    completion_mask,
    completion_mtp_logprobs,
    plain_forward,
    rollout_batch,
)
from decomp.integrations.trl.callback import DecompositionCallback
from decomp.integrations.trl.defaults import HF_DIRECTIONS, hf_instrument_config
from decomp.integrations.trl.heldout import heldout_batch
from decomp.integrations.trl.loss import trl_rl_loss
from decomp.integrations.trl.support import (
    SUPPORTED_LOSS_TYPES,
    TRL_TESTED_RANGE,
    check_trl_version,
    unsupported_loss_settings,
    unsupported_model_settings,
)
from decomp.integrations.trl.trainer import MTPGRPOTrainer

__all__ = [
    "HF_DIRECTIONS", "MTP_ATTR", "SUPPORTED_LOSS_TYPES", "TRL_TESTED_RANGE", "DecompositionCallback", "InstrumentConfig",
    "MTPConfig", "MTPGRPOTrainer", "MTPModelView", "add_mtp", "check_trl_version", "completion_mask",
    "completion_mtp_logprobs", "heldout_batch", "hf_instrument_config",
    "plain_forward", "rollout_batch", "trl_rl_loss", "unsupported_loss_settings", "unsupported_model_settings",
]
