"""``MTPGRPOTrainer``: TRL's ``GRPOTrainer`` with the MTP term (see the package docstring)."""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from trl import GRPOConfig, GRPOTrainer

from decomp.config import InstrumentConfig, MTPConfig
from decomp.integrations.trl.align import (
    HiddenCapture,
    add_mtp,
    completion_advantages,
    completion_mask,
    completion_mtp_logprobs,
)
from decomp.integrations.trl.callback import DecompositionCallback
from decomp.integrations.trl.heldout import (
    check_heldout_prompts,
    unsupported_heldout_settings,
)
from decomp.integrations.trl.support import (
    PPO_CLIPPED_LOSS_TYPES,
    check_trl_version,
    unsupported_model_settings,
)
from decomp.regimes import MTPTerm, Regime
from decomp.rules import RULES, ProxyInputs, get_rule


class MTPGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` plus the MTP term of docs/method.md §2 (package docstring).

    Takes every ``GRPOTrainer`` argument, plus ``mtp_config`` (:class:`~decomp.config.MTPConfig`:
    regime, scale ``c``, estimator, depth, init), ``instrument_config``
    (:class:`~decomp.config.InstrumentConfig`; ``None``, the default, measures nothing) and
    ``decomp_dir`` (the decomp run directory; default: the trainer's ``output_dir``). The MTP
    modules are attached at construction when the model has none, initialised from the
    ``GRPOConfig``'s seed. Per optimizer step the applied ``λ`` and ``L_MTP`` are logged as
    ``mtp/coef`` and ``mtp/loss``. The caller's ``GRPOConfig`` is never modified.

    ``decomp_overwrite``: what ``train()`` does with a ``decomp_dir`` that already holds decomp
    records (``decomp_run.json``, ``metrics.jsonl``, ``decomposition.jsonl``). ``False``, the
    default: a new run (not resumed from a checkpoint) refuses to start there, since it would
    erase them, and a resume refuses a ``decomp_run.json`` that is unreadable or whose settings
    differ from this trainer's (any but ``trl_version``, which warns): the records would describe
    two runs. A resume that passes keeps the records up to its checkpoint's step. ``True``: the
    old records are deleted and the run starts them over (a resume included).

    ``heldout_prompts``: evaluation prompts in the ``train_dataset``'s format (a
    ``datasets.Dataset`` or a list of dict rows: a ``"prompt"`` column, plain or conversational,
    plus the columns the reward functions read). Given, and with ``instrument_config.heldout``,
    every decomposition is also evaluated on a ``heldout`` split: a fresh micro-batch of the
    training one's size sampled from the current policy on these prompts
    (:mod:`~decomp.integrations.trl.heldout`; training is left bit-identical). ``None``, the
    default: no held-out split, only the in-sample ``train`` one. Either way
    ``instrument_config.search`` adds the realized optimum ``λ̂`` to every record. Reward models
    (``nn.Module`` reward functions), tools, environments, ``rollout_func`` and vision processors
    are refused with ``heldout_prompts``.
    """

    def __init__(
        self,
        *args: Any,
        mtp_config: MTPConfig | None = None,
        instrument_config: InstrumentConfig | None = None,
        decomp_dir: str = "",
        heldout_prompts: Any = None,
        decomp_overwrite: bool = False,
        **kwargs: Any,
    ) -> None:
        check_trl_version()
        self.mtp_config = MTPConfig() if mtp_config is None else mtp_config
        self.mtp_config.validate()
        if self.mtp_config.occ_control != "none":
            raise ValueError(f"occ_control={self.mtp_config.occ_control} is not supported inside TRL yet (its signs "
                             "are seeded per update of the reference loop, and λ* needs the step's updates, which "
                             "the TRL integration does not compute); the reference loop (decomp run) runs it")
        self.instrument_config = InstrumentConfig(decomp_every=0) if instrument_config is None else instrument_config
        self.instrument_config.validate()
        for name, off in (("group_errors", False), ("heldout_groups", 0), ("noise_ceiling", False)):
            if getattr(self.instrument_config, name) != off:
                raise ValueError(f"{name} is not supported inside TRL yet (its micro-batches carry no prompt groups, "
                                 "and its held-out micro-batch has the training micro-batch's size); the reference "
                                 "loop (decomp run) measures it")
        self.decomp_dir = decomp_dir
        self.decomp_overwrite = decomp_overwrite  # read at train begin (DecompositionCallback)
        # checked before the (slow) parent constructor: a bad argument fails at once
        self.heldout_prompts = None if heldout_prompts is None else check_heldout_prompts(heldout_prompts)
        args, kwargs = _with_ddp_settings(args, kwargs)
        super().__init__(*args, **kwargs)
        self._check_supported()
        cfg = self.mtp_config
        add_mtp(self.model, depth=cfg.mtp_depth, init=cfg.mtp_init, seed=self.args.seed)
        self.regime: Regime = cfg.make_regime((float(self.epsilon_low), float(self.epsilon_high)))
        if self.regime.rule is not None and "logprobs" in get_rule(self.regime.rule).needs \
                and not self.off_policy_updates():
            warnings.warn(
                f"{self.regime.name}: with gradient_accumulation_steps a multiple of steps_per_generation × num_iterations, every "
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
        self.decomposition_callback = DecompositionCallback(self, every=self.instrument_config.decomp_every)
        self.add_callback(self.decomposition_callback)

    def _check_supported(self) -> None:
        from accelerate.utils import is_peft_model

        if is_peft_model(self.model):
            raise TypeError("MTPGRPOTrainer does not support PEFT models yet")
        problems = unsupported_model_settings(self)
        if problems:
            raise ValueError(f"MTPGRPOTrainer does not support {', '.join(problems)}")
        heldout = [] if self.heldout_prompts is None else unsupported_heldout_settings(self)
        if heldout:
            raise ValueError(f"heldout_prompts: the held-out split does not support {', '.join(heldout)}")
        regime = self.mtp_config.regime
        if regime not in TRL_REGIMES:
            raise ValueError(f"regime {regime!r} is not supported inside TRL yet (supported: {', '.join(TRL_REGIMES)}); "
                             "the reference loop (decomp run) runs every regime")
        rule = self.mtp_config.make_regime().rule
        if rule is not None and not get_rule(rule).distributable:
            usable = [r.name for r in RULES.values() if r.distributable]
            raise ValueError(f"the coefficient rule {rule!r} needs {get_rule(rule).described_needs()} at every update, "
                             f"which the TRL integration does not compute; rules it applies: {', '.join(usable)}")
        if regime in ("policy", "occ") and self.loss_type not in PPO_CLIPPED_LOSS_TYPES:
            raise ValueError(
                f"regime {regime!r} applies the PPO-clipped policy loss to the MTP head with TRL's "
                f"epsilon/epsilon_high as clip range; loss_type={self.loss_type!r} has no such range "
                f"(use one of {', '.join(PPO_CLIPPED_LOSS_TYPES)})"
            )

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
            with HiddenCapture(lm.base_model) as capture:
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

    def _mtp_term(
        self, lm: nn.Module, inputs: dict[str, Any], hidden: Tensor, logp: Tensor
    ) -> tuple[MTPTerm, dict[str, Any]]:
        """The regime's MTP term on TRL's tensors, averaged over depths (``λ`` the mean of theirs),
        and the tensors ``λ`` was computed from. ``hidden``: decoder output on the micro-batch;
        ``logp``: the main head's per-token log-probs ``[B, C]`` from the same forward. A rule's
        ``λ`` (``occ``) comes from its sums, all-reduced across processes."""
        mtp_logps, valids = completion_mtp_logprobs(lm, hidden, inputs, self.regime.detach, self.temperature)
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old
        mask = completion_mask(inputs)
        adv = completion_advantages(inputs, old)
        terms = []
        for m, valid in zip(mtp_logps, valids, strict=True):
            coef = self.regime.scale if self.regime.rule is None else self.rule_coefficient(m, logp, old, mask & valid)
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

    def rule_coefficient(self, mtp_logp: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor) -> float:
        """``λ`` of one depth from the regime's rule, on the sums of every process (the rule's
        ``statistics``, all-reduced); the regime's fallback where undefined."""
        rule = get_rule(self.regime.rule)
        stats = rule.statistics(ProxyInputs(mtp_logp, logp, old_logp, mask))
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats, reduction="sum")
        coef = rule.from_statistics(stats, self.regime.scale)
        return self.regime.fallback if math.isnan(coef) else coef

    def off_policy_updates(self) -> bool:
        """Whether some updates start away from the sampling policy (TRL then keeps ``ℓ^old``):
        ``gradient_accumulation_steps`` not a multiple of ``steps_per_generation × num_iterations``
        (or vLLM's importance-sampling correction)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return bool(self.args.gradient_accumulation_steps % generate_every) or bool(
            getattr(self, "use_vllm", False) and getattr(self, "vllm_importance_sampling_correction", False)
        )

    def log_metric(self, name: str, value: float) -> None:
        """Append ``value`` to the training log under ``name`` (averaged by TRL at each log)."""
        self._metrics["train"][name].append(value)

    def last_logged(self, name: str) -> float | None:
        """The last value logged under ``name`` since the last log, or ``None``."""
        values = self._metrics["train"].get(name)
        return float(values[-1]) if values else None

    def pop_step_mtp(self) -> dict[str, float]:
        """Mean applied ``λ`` and ``L_MTP`` over the micro-batches since the last call."""
        out = {k: (sum(v) / len(v) if v else math.nan) for k, v in self._step_mtp.items()}
        self._step_mtp = {"coef": [], "loss": []}
        return out


TRL_REGIMES = ("detach", "detach-inputs", "ce", "policy", "occ")


def _with_ddp_settings(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``GRPOTrainer``'s arguments with a copy of its ``GRPOConfig`` (built as TRL builds its
    default when none is given) whose ``ddp_find_unused_parameters`` is ``False``.

    The MTP term runs outside DDP's forward, so DDP must not look for unused parameters (it
    would take the MTP modules for unused, then receive their gradients); every parameter gets a
    gradient at every step in every regime, so the search is not needed. It must be set before
    ``GRPOTrainer`` builds its accelerator, which reads it.
    """
    bound = inspect.signature(GRPOTrainer.__init__).bind(None, *args, **kwargs)
    config = bound.arguments.get("args")
    if config is None:
        model = bound.arguments["model"]
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
        config = GRPOConfig(f"{str(name).split('/')[-1]}-GRPO")  # exactly GRPOTrainer's default
    if config.ddp_find_unused_parameters:
        raise ValueError("MTPGRPOTrainer needs ddp_find_unused_parameters=False (the MTP term runs outside "
                         "DDP's forward)")
    config = copy.copy(config)
    config.ddp_find_unused_parameters = False
    bound.arguments["args"] = config
    return bound.args[1:], bound.kwargs
