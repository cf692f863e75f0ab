"""MTP regimes, OCC and the exact decomposition inside TRL's ``GRPOTrainer``.

:class:`MTPGRPOTrainer` is a ``GRPOTrainer`` whose loss gains the MTP term of DESIGN.md §2,

    loss = TRL's GRPO loss + λ·L_MTP / gradient_accumulation_steps,

computed from the decoder states of TRL's own forward pass (captured by a forward hook, so the
MTP term costs one MTP block and head, not a second trunk pass), on TRL's completion tensors,
with TRL's old log-probs ``ℓ^old`` and advantages. The MTP modules are attached to the causal
LM as the submodule ``decomp_mtp`` (:func:`add_mtp`), so TRL's optimizer, accelerate's DDP
wrapper and ``save_model`` all see them. The MTP policy loss (``policy``, ``occ``) is the
PPO-clipped surrogate with TRL's ``epsilon``/``epsilon_high`` (TRL's ``delta`` is not applied to
it); with ``K > 1`` depths the applied term is the mean of the depths' ``λ_k·L_k`` and the
logged ``λ`` their mean.

Token alignment. TRL scores completion token ``j`` (absolute position ``P + j`` after a prompt
of ``P`` tokens) with the main head at position ``P + j − 1``; MTP depth ``k`` predicts the same
token from position ``P + j − k − 1`` (DESIGN.md §1), so ``m``, ``ℓ``, ``ℓ^old``, ``A`` and the
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
(:func:`decomp.instrument.instrument_update`) in ``decomposition.jsonl``, also logged through
the trainer's logger as ``decomp/<field>`` (``decomp/<direction>/<field>`` for the shadow
directions), so they reach TensorBoard or Weights & Biases. ``decomp plot``, ``validate`` and
``report`` read that directory.

What the decomposition measures: the step the optimizer is about to take, modelled on the last
micro-batch of the step (with ``gradient_accumulation_steps = 1``, TRL's default, that *is* the
step), with TRL's own RL loss (:func:`trl_rl_loss`: its loss type, clipping, KL and
normalisation) driving ``u_RL``, the live optimizer state and learning rate. Global-norm
gradient clipping is not modelled; each record says whether it was active (``grad_clipped``).

Multi-GPU (accelerate DDP): every rank computes the MTP term on its own micro-batch and DDP
averages the gradients (the trainer sets ``ddp_find_unused_parameters=False``: the MTP term runs
outside DDP's forward); the OCC sums are all-reduced, while ``mtp/loss`` is each rank's own. The
decomposition runs on the main process only, on its own micro-batch, with its local (not
all-reduced) gradients and the replicated optimizer state — a one-rank sample of the step, not
the averaged step — while the other ranks wait at their next collective. Sharded parameters
(FSDP, DeepSpeed ZeRO-3) are refused by the trainer, sharded optimizer state (any DeepSpeed
stage) by the decomposition; models whose head applies logit transforms (soft-capping, logit
scales: Gemma 2, Granite, Cohere) are refused, since TRL's fused head applies them.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    import trl
    from transformers import TrainerCallback
    from trl import GRPOTrainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"decomp.integrations.trl needs TRL: pip install 'decomp[trl]' ({err})"
    ) from None

from decomp import __version__
from decomp.instrument import DIRECTIONS, instrument_update
from decomp.model import token_logprobs
from decomp.mtp import (
    DETACH_MODES,
    _decoder_parts,
    build_mtp_modules,
    mtp_head,
    mtp_logits_from_hidden,
    mtp_states_from_hidden,
)
from decomp.objectives import RolloutBatch
from decomp.occ import PROXY_ESTIMATORS, coefficient_from_statistics, proxy_statistics
from decomp.regimes import OCC, REGIMES, MTPTerm, Regime, make_regime
from decomp.runlog import RUN_FILE, SCHEMA_VERSION, JsonlWriter, truncate_jsonl

TRL_TESTED_RANGE = ">=1.16,<1.17"  # the range the tests run on; pyproject's `trl` extra pins it
MTP_ATTR = "decomp_mtp"  # the LM submodule holding the MTP modules
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo")


def check_trl_version(version: str | None = None) -> str:
    """Warn (``UserWarning``) when the installed TRL is outside :data:`TRL_TESTED_RANGE`."""
    from packaging.specifiers import SpecifierSet

    version = trl.__version__ if version is None else version
    if version not in SpecifierSet(TRL_TESTED_RANGE):
        warnings.warn(
            f"decomp.integrations.trl is tested with trl{TRL_TESTED_RANGE}, found trl {version}: GRPOTrainer "
            f"internals it relies on may differ (pip install 'trl{TRL_TESTED_RANGE}')",
            UserWarning,
            stacklevel=2,
        )
    return version


@dataclass
class MTPConfig:
    """Everything the MTP term and its measurement add to a ``GRPOConfig``.

    The MTP policy loss clips with TRL's own ``epsilon``/``epsilon_high``; logits are divided by
    TRL's sampling ``temperature`` for the MTP head as for the main head.
    """

    regime: str = "detach"  # detach, detach-inputs, ce, policy or occ (DESIGN.md §2)
    coef: float = 0.1  # c: the MTP coefficient (occ: the estimator's scale)
    estimator: str = "masked"  # occ only: reference, masked or pooled (DESIGN.md §4)
    policy_form: str = "ratio"  # policy/occ: "ratio" (clipped surrogate on m) or "reinforce"
    depth: int = 1  # K, MTP depths, attached when the model has none yet
    init: str = "copy_last"  # MTP block init: copy of the last decoder layer, or "random"
    seed: int = 0  # seed of the MTP modules' initialisation
    decomp_every: int = 0  # optimizer steps between exact decompositions (0: never)
    decomp_directions: str = "active,ce,policy"  # which MTP directions each decomposition measures
    log_dir: str = ""  # decomp run directory ("" : the trainer's output_dir)

    def validate(self) -> None:
        if self.regime not in REGIMES:
            raise ValueError(f"unknown regime {self.regime!r}; valid regimes: {', '.join(REGIMES)}")
        if self.estimator not in PROXY_ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; valid: {', '.join(PROXY_ESTIMATORS)}")
        if not math.isfinite(self.coef):
            raise ValueError(f"coef must be finite, got {self.coef}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.decomp_every < 0:
            raise ValueError(f"decomp_every must be >= 0, got {self.decomp_every}")
        bad = [d for d in self.directions() if d not in DIRECTIONS]
        if bad:
            raise ValueError(f"unknown decomposition direction(s) {bad}; valid: {', '.join(DIRECTIONS)}")

    def directions(self) -> tuple[str, ...]:
        return tuple(d.strip() for d in self.decomp_directions.split(",") if d.strip())


def add_mtp(lm: nn.Module, depth: int = 1, init: str = "copy_last", seed: int = 0) -> nn.ModuleList:
    """Attach ``depth`` MTP modules (:func:`decomp.mtp.build_mtp_modules`) to the causal LM as
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

    def forward(
        self, tokens: Tensor, detach: str = "none", with_mtp: bool = True, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        if detach not in DETACH_MODES:
            raise ValueError(f"detach must be one of {DETACH_MODES}, got {detach!r}")
        decoder, _, _ = _decoder_parts(self.lm)
        h = decoder(input_ids=tokens, attention_mask=attention_mask, use_cache=False).last_hidden_state
        main = self.lm.get_output_embeddings()(h) / self.temperature
        if not with_mtp:
            return main, []
        B, T = tokens.shape
        positions = torch.arange(T, device=tokens.device).expand(B, T)
        mtp = mtp_logits_from_hidden(self.lm, getattr(self.lm, MTP_ATTR), h, tokens, detach, positions, attention_mask)
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


def _advantages(inputs: dict[str, Any], like: Tensor) -> Tensor:
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
        advantages=aligned(_advantages(inputs, old)),
        old_logp=aligned(old),
        response_start=pad,
        attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
    )


LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
PPO_CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def unsupported_model_settings(trainer: GRPOTrainer) -> list[str]:
    """Model and trainer settings the MTP term cannot follow (empty: all supported).

    TRL's fused head applies the config's logit transforms (soft-capping, logit scales); the MTP
    head and :class:`MTPModelView` use the plain output head, so such models are refused rather
    than measured with a different policy. Sharded parameters (FSDP, DeepSpeed ZeRO-3) are
    refused: the MTP head reads the shared output head's weight outside the model's forward.
    """
    text_config = trainer.model.config.get_text_config()
    problems = [
        f"{name}={getattr(text_config, name)!r}"
        for name in LOGIT_TRANSFORMS
        if getattr(text_config, name, None) not in (None, 1.0)
    ]
    if getattr(trainer, "is_fsdp_enabled", False):
        problems.append("FSDP")
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if getattr(trainer, "is_deepspeed_enabled", False) and getattr(plugin, "zero_stage", 0) == 3:
        problems.append("DeepSpeed ZeRO-3")
    return problems


def unsupported_loss_settings(trainer: GRPOTrainer) -> list[str]:
    """The trainer settings :func:`trl_rl_loss` does not reproduce (empty: all supported)."""
    args = trainer.args
    problems = []
    if trainer.loss_type not in SUPPORTED_LOSS_TYPES:
        problems.append(f"loss_type={trainer.loss_type!r} (supported: {', '.join(SUPPORTED_LOSS_TYPES)})")
    if trainer.importance_sampling_level != "token":
        problems.append(f"importance_sampling_level={trainer.importance_sampling_level!r}")
    if getattr(trainer, "top_entropy_quantile", 1.0) < 1.0:
        problems.append("top_entropy_quantile < 1")
    if getattr(trainer, "off_policy_mask_threshold", None) is not None:
        problems.append("off_policy_mask_threshold")
    if getattr(trainer, "use_vllm", False):
        problems.append("use_vllm")
    if getattr(trainer, "_entropy_bonus_enabled", False):
        problems.append("an entropy bonus")
    if getattr(trainer, "aux_loss_enabled", False):
        problems.append("a MoE auxiliary loss")
    if getattr(args, "use_liger_kernel", False):
        problems.append("use_liger_kernel")
    if getattr(args, "cast_lm_head_to_fp32", False) and next(trainer.model.parameters()).dtype != torch.float32:
        problems.append("cast_lm_head_to_fp32 with a model not in float32")
    return problems


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
    adv = _advantages(inputs, old_logp)
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


@contextmanager
def plain_forward(lm: nn.Module) -> Iterator[None]:
    """The LM in eval mode (DESIGN.md §5: no dropout in measurements), without activation
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


class _HiddenCapture:
    """Records the decoder's ``last_hidden_state`` while active (a forward hook)."""

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder
        self.states: list[Tensor] = []
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.states.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    def __enter__(self) -> _HiddenCapture:
        self._handle = self.decoder.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def hidden(self) -> Tensor:
        if not self.states:
            raise RuntimeError("TRL's forward did not run the decoder: cannot compute the MTP term")
        return self.states[0] if len(self.states) == 1 else torch.cat(self.states, dim=0)


class MTPGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` plus the MTP term of DESIGN.md §2 (module docstring).

    Takes every ``GRPOTrainer`` argument and ``mtp_config`` (:class:`MTPConfig`). The model's
    MTP modules are attached at construction when it has none. Per optimizer step the applied
    ``λ`` and ``L_MTP`` are logged as ``mtp/coef`` and ``mtp/loss``.
    """

    def __init__(self, *args: Any, mtp_config: MTPConfig | None = None, **kwargs: Any) -> None:
        check_trl_version()
        self.mtp_config = MTPConfig() if mtp_config is None else mtp_config
        self.mtp_config.validate()
        # The MTP term runs outside DDP's forward, so DDP must not look for unused parameters
        # (it would take the MTP modules for unused, then receive their gradients). Every
        # parameter gets a gradient at every step in every regime, so the search is not needed.
        # Set before GRPOTrainer builds its accelerator, which reads it.
        config = kwargs["args"] if "args" in kwargs else (args[2] if len(args) > 2 else None)
        if config is not None:
            if config.ddp_find_unused_parameters:
                raise ValueError("MTPGRPOTrainer needs ddp_find_unused_parameters=False (the MTP term runs outside "
                                 "DDP's forward)")
            config.ddp_find_unused_parameters = False
        super().__init__(*args, **kwargs)
        from accelerate.utils import is_peft_model

        if is_peft_model(self.model):
            raise TypeError("MTPGRPOTrainer does not support PEFT models yet")
        problems = unsupported_model_settings(self)
        if problems:
            raise ValueError(f"MTPGRPOTrainer does not support {', '.join(problems)}")
        cfg = self.mtp_config
        if cfg.regime in ("policy", "occ") and self.loss_type not in PPO_CLIPPED_LOSS_TYPES:
            raise ValueError(
                f"regime {cfg.regime!r} applies the PPO-clipped policy loss to the MTP head with TRL's "
                f"epsilon/epsilon_high as clip range; loss_type={self.loss_type!r} has no such range "
                f"(use one of {', '.join(PPO_CLIPPED_LOSS_TYPES)})"
            )
        add_mtp(self.model, depth=cfg.depth, init=cfg.init, seed=cfg.seed)
        options: dict[str, Any] = {"coef": cfg.coef}
        if cfg.regime in ("policy", "occ"):
            options.update(form=cfg.policy_form, clip_low=float(self.epsilon_low), clip_high=float(self.epsilon_high))
        if cfg.regime == "occ":
            options["estimator"] = cfg.estimator
        self.regime: Regime = make_regime(cfg.regime, **options)
        if isinstance(self.regime, OCC) and not self.off_policy_updates():
            warnings.warn(
                "occ: with gradient_accumulation_steps a multiple of steps_per_generation × num_iterations, every "
                "update of a generation batch happens before the optimizer step (ℓ = ℓ^old), so the OCC proxy and "
                "λ are 0 at every step; use num_iterations or steps_per_generation so that "
                "gradient_accumulation_steps % (steps_per_generation × num_iterations) != 0",
                UserWarning,
                stacklevel=2,
            )
        self._capturing_logps = False
        self._captured_logps: list[Tensor] = []
        self._step_mtp: dict[str, list[float]] = {"coef": [], "loss": []}
        self.last_micro_batch: dict[str, Any] | None = None  # what the decomposition measures
        self.decomposition_callback = DecompositionCallback(self, every=cfg.decomp_every)
        self.add_callback(self.decomposition_callback)

    # --- the MTP term ---------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._capturing_logps:
            self._captured_logps.append(out[0])
        return out

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        lm = self.accelerator.unwrap_model(model)
        self._captured_logps = []
        self._capturing_logps = True
        try:
            with _HiddenCapture(lm.base_model) as capture:
                loss = super()._compute_loss(model, inputs)
        finally:
            self._capturing_logps = False
        logp = self._captured_logps[-1]
        with self.accelerator.autocast():  # as TRL's own forward
            term, tensors = self._mtp_term(lm, inputs, capture.hidden(), logp)
        mode = "train" if self.model.training else "eval"
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if mode == "train":
            self._step_mtp["coef"].append(term.coef)
            self._step_mtp["loss"].append(float(term.unit_loss.detach()))
            self.last_micro_batch = {"inputs": inputs, "logp": logp.detach(), "coef": term.coef, "tensors": tensors}
        self._metrics[mode]["mtp/coef"].append(term.coef)
        self._metrics[mode]["mtp/loss"].append(float(term.unit_loss.detach()))
        return loss + term.loss / normalizer

    def mtp_term(self, lm: nn.Module, inputs: dict[str, Any], hidden: Tensor, logp: Tensor) -> MTPTerm:
        """The regime's MTP term on TRL's tensors, averaged over depths (``λ`` the mean of theirs).

        ``hidden``: decoder output on the micro-batch; ``logp``: the main head's per-token
        log-probs ``[B, C]`` from the same forward. OCC's ``λ`` comes from the proxy sums,
        all-reduced across processes.
        """
        return self._mtp_term(lm, inputs, hidden, logp)[0]

    def _mtp_term(
        self, lm: nn.Module, inputs: dict[str, Any], hidden: Tensor, logp: Tensor
    ) -> tuple[MTPTerm, dict[str, Any]]:
        mtp_logps, valids = completion_mtp_logprobs(lm, hidden, inputs, self.regime.detach, self.temperature)
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old
        mask = completion_mask(inputs)
        adv = _advantages(inputs, old)
        terms = []
        for m, valid in zip(mtp_logps, valids, strict=True):
            coef = self.occ_coefficient(m, logp, old, mask & valid) if isinstance(self.regime, OCC) else self.regime.coef
            terms.append(self.regime.term_at(coef, m, old, adv, mask & valid))
        term = MTPTerm(
            torch.stack([t.loss for t in terms]).mean(),
            torch.stack([t.unit_loss for t in terms]).mean(),
            sum(t.coef for t in terms) / len(terms),
        )
        # the exact [B, C] tensors λ was computed from (what a check of OCC needs)
        tensors = {"mtp_logp": [m.detach() for m in mtp_logps], "logp": logp.detach(), "old_logp": old.detach(),
                   "mask": [mask & v for v in valids]}
        return term, tensors

    def occ_coefficient(self, mtp_logp: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor) -> float:
        """OCC's ``λ`` from the proxy sums of every process (0 where undefined)."""
        stats = proxy_statistics(mtp_logp - old_logp, logp - old_logp, mask)
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats, reduction="sum")
        lam = coefficient_from_statistics(stats, self.regime.coef, self.regime.estimator)  # type: ignore[attr-defined]
        return 0.0 if math.isnan(lam) else lam

    def off_policy_updates(self) -> bool:
        """Whether some updates start away from the sampling policy (TRL then keeps ``ℓ^old``):
        ``gradient_accumulation_steps`` not a multiple of ``steps_per_generation × num_iterations``
        (or vLLM's importance-sampling correction)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return bool(self.args.gradient_accumulation_steps % generate_every) or bool(
            getattr(self, "use_vllm", False) and getattr(self, "vllm_importance_sampling_correction", False)
        )

    def pop_step_mtp(self) -> dict[str, float]:
        """Mean applied ``λ`` and ``L_MTP`` over the micro-batches since the last call."""
        out = {k: (sum(v) / len(v) if v else math.nan) for k, v in self._step_mtp.items()}
        self._step_mtp = {"coef": [], "loss": []}
        return out


class DecompositionCallback(TrainerCallback):
    """Writes the decomp run directory and, every ``every`` optimizer steps, the exact
    decomposition of the coming step (module docstring). Installed by :class:`MTPGRPOTrainer`.
    """

    def __init__(self, trainer: MTPGRPOTrainer, every: int = 0) -> None:
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.trainer = trainer
        self.every = every
        self.out: Path | None = None
        self._writers: dict[str, JsonlWriter] = {}
        self._decomp_seconds = 0.0
        self._reward = math.nan  # mean reward of the latest generation batch

    # run directory ------------------------------------------------------------------------

    def _main(self) -> bool:
        return bool(self.trainer.accelerator.is_main_process)

    def _check_measurable(self) -> None:
        tr = self.trainer
        problems = unsupported_loss_settings(tr)
        if getattr(tr, "is_deepspeed_enabled", False) or getattr(tr, "is_fsdp_enabled", False):
            problems.append("DeepSpeed/FSDP (sharded parameters or optimizer state)")
        if problems:
            raise ValueError(f"decomp_every > 0: the decomposition does not support {', '.join(problems)}")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.every:
            self._check_measurable()
        if not self._main():
            return
        tr = self.trainer
        self.out = Path(tr.mtp_config.log_dir or args.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "decomposition.jsonl"):
            # a resumed run: drop records of steps after the checkpoint
            truncate_jsonl(self.out / name, lambda r: isinstance(r.get("step"), int) and r["step"] <= state.global_step)
        config = {
            **asdict(tr.mtp_config),
            "trainer": "trl.GRPOTrainer",
            "trl_version": trl.__version__,
            "model": getattr(tr.model.config, "_name_or_path", ""),
            "seed": args.seed,
            "mtp_coef": tr.mtp_config.coef,
            "learning_rate": args.learning_rate,
            "loss_type": tr.loss_type,
            "beta": float(tr.beta),
            "num_generations": tr.num_generations,
            "num_iterations": tr.num_iterations,
            "steps_per_generation": args.steps_per_generation,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_grad_norm": args.max_grad_norm,
            "num_processes": tr.accelerator.num_processes,
        }
        text = json.dumps(
            {"config": config, "decomp_version": __version__, "schema_version": SCHEMA_VERSION}, indent=2
        )
        (self.out / RUN_FILE).write_text(text, encoding="utf-8")
        self._writers = {name: JsonlWriter(self.out / f"{name}.jsonl") for name in ("metrics", "decomposition")}

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    # per step -----------------------------------------------------------------------------

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step + 1  # the step about to be taken
        if not self.every or step % self.every or not self._main() or self.trainer.last_micro_batch is None:
            return
        start = time.perf_counter()
        records = self.measure()
        tr = self.trainer
        for record in records:
            self._writers["decomposition"].write({"step": step, "regime": tr.regime.name, **record})
            prefix = "decomp/" if record["direction"] == "active" else f"decomp/{record['direction']}/"
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    tr._metrics["train"][prefix + key].append(float(value))
        self._decomp_seconds += time.perf_counter() - start

    def measure(self) -> list[dict[str, Any]]:
        """The decomposition records of the coming optimizer step (one per direction)."""
        tr = self.trainer
        micro = tr.last_micro_batch
        assert micro is not None
        inputs = micro["inputs"]
        lm = tr.accelerator.unwrap_model(tr.model)
        view = MTPModelView(lm, tr.temperature)
        batch = rollout_batch(inputs, micro["logp"])
        old = batch.response(batch.old_logp)
        optimizer = getattr(tr.optimizer, "optimizer", tr.optimizer)  # accelerate wraps it
        grad_clipped = self._grad_clipped(lm)
        with plain_forward(lm):
            result = instrument_update(
                view, batch, optimizer, tr.regime, coef=tr.mtp_config.coef, active_coef=float(micro["coef"]),
                clip=(float(tr.epsilon_low), float(tr.epsilon_high)), directions=tr.mtp_config.directions(),
                rl_loss_of_logp=trl_rl_loss(tr, inputs, old),
            )
        return [{**r, "grad_clipped": grad_clipped} for r in result.decompositions]

    def _grad_clipped(self, lm: nn.Module) -> bool:
        max_norm = self.trainer.args.max_grad_norm
        if not max_norm or max_norm <= 0:
            return False
        grads = [p.grad for p in lm.parameters() if p.grad is not None]
        if not grads:
            return False
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        return norm >= max_norm * (1 - 1e-4)  # clipping scaled the gradient to max_norm

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        applied = self.trainer.pop_step_mtp()
        if not self._main() or "metrics" not in self._writers:
            return
        rewards = self.trainer._metrics["train"].get("reward")
        if rewards:  # TRL appends one per generation batch and clears the list at each log
            self._reward = float(rewards[-1])
        self._writers["metrics"].write({
            "step": state.global_step, "regime": self.trainer.regime.name, "reward_mean": self._reward,
            "mtp_coef": applied["coef"], "mtp_loss": applied["loss"], "decomp_seconds": self._decomp_seconds,
        })
        self._decomp_seconds = 0.0
