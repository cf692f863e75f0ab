"""What the TRL integration supports: the tested TRL range and the settings it refuses.

Refusing is better than measuring something else: a model whose head applies logit transforms
(TRL's fused head applies them, the MTP head would not), sharded parameters (the MTP head reads
the shared head's weight outside the model's forward), and loss settings that
:func:`~decomp.integrations.trl.loss.trl_rl_loss` does not reproduce.
"""

from __future__ import annotations

import warnings

import torch
import trl
from trl import GRPOTrainer

TRL_TESTED_RANGE = ">=1.16,<1.17"  # the range the tests run on; pyproject's `trl` extra pins it
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
