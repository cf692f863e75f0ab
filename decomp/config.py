"""The MTP settings a trainer adds to its own: one definition for the reference loop and TRL.

:class:`MTPConfig` says how the MTP loss enters training (regime, scale ``c``, OCC estimator),
:class:`InstrumentConfig` what is measured and how often. The reference loop's
:class:`~decomp.training.config.TrainConfig` extends both; :class:`~decomp.integrations.trl.
MTPGRPOTrainer` takes them as they are. Each field carries its help text as dataclass metadata
(:func:`option`), so ``decomp run --help-config`` and the docs read it from one place, and each
class validates itself once (:meth:`MTPConfig.validate`).

Names: ``coef`` is always a coefficient ``λ`` multiplying ``L_MTP`` in one update; ``mtp_scale``
is the configured constant ``c`` (the public implementation's ``mtp_loss_scaling_factor``):
``λ = c`` for the fixed-coefficient regimes, ``λ = c · proxy`` for ``occ``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from decomp.regimes import OCC, REGIMES, SPLIT_HEAD_LOSSES, Policy, Regime, make_regime
from decomp.rules import OCC_CONTROLS, ORACLE_RULES, estimator_rules
from decomp.search import SEARCH_DECADES
from decomp.vocabulary import DIRECTIONS, SPLITS

MTP_INITS = ("copy_last", "random")
POLICY_FORMS = ("ratio", "reinforce")


# a real LM's J-side double-backward graph grows with the batch; chunks of 4 sequences keep an
# instrumented update of SmolLM2 within the memory target of docs/benchmarks.md
AUTO_HVP_ROWS = 4


def option(default: Any, help: str) -> Any:
    """A dataclass field with its help text (read by :func:`field_help`)."""
    return field(default=default, metadata={"help": help})


def field_help(cls: type) -> list[tuple[str, Any, str]]:
    """``(name, default, help)`` of every field of a config dataclass, in definition order."""
    return [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]


def parse_directions(text: str) -> tuple[str, ...]:
    """``"active,ce"`` → ``("active", "ce")``; a ``ValueError`` names unknown directions."""
    directions = tuple(d.strip() for d in text.split(",") if d.strip())
    bad = [d for d in directions if d not in DIRECTIONS]
    if not directions or bad:
        raise ValueError(f"directions must be a comma-separated subset of {', '.join(DIRECTIONS)}, got {text!r}")
    return directions


@dataclass(frozen=True)
class MTPConfig:
    """How the MTP loss enters the joint loss ``−J_clip + λ·L_MTP``."""

    regime: str = option("detach", f"MTP regime: {' | '.join(REGIMES)}")
    mtp_scale: float = option(0.1, "c: λ for fixed-coefficient regimes, the estimator's scale for occ")
    occ_estimator: str = option("masked", "occ: the coefficient rule that sets λ at every update (one of the "
                                "estimator rules listed below; those beyond the proxies need the step's updates)")
    occ_control: str = option("none", "occ/occ-split: a control of the estimate λ_occ: none | random_sign (λ = "
                              "±|λ_occ|, the sign drawn per update from the seed and the update's index) | "
                              "lambda_star_magnitude (λ = sign(λ_occ)·|λ*|, λ* the exact rule's on the training "
                              "mini-batch; 0 where either is undefined or 0)")
    split_head_loss: str = option("distill", "occ-split: the MTP module's own loss at λ = c, trunk detached: "
                                  "distill (soft cross-entropy against the policy's detached distribution) | ce "
                                  "(detach's cross-entropy of the sampled tokens)")
    policy_form: str = option("ratio", f"policy/occ MTP loss: {' | '.join(POLICY_FORMS)}")
    mtp_depth: int = option(1, "K: MTP depths (depth k predicts token t+k+1)")
    mtp_init: str = option("copy_last", "Hugging Face hosts: MTP block copied from the last layer, or random")
    oracle_bound: float = option(1e6, "oracle: the search's bound on |λ| (below the default 1e6, a trust region "
                                 "whose constrained optimum is applied, ±bound included)")
    oracle_horizon: int = option(1, "oracle: k, apply the optimum of the k-step realized gain (the update, then "
                                 "k−1 RL-only updates on lookahead rollout batches from the current policy; "
                                 "docs/method.md §3.6); costs (k−1) backward passes per evaluated coefficient")
    oracle_decades: int = option(SEARCH_DECADES, "oracle: decades of the search's grid below oracle_bound (one "
                                 "point per decade each side: 2·(decades+1) coefficients before refinement); fewer "
                                 "decades make an oracle over a long horizon affordable (each coefficient costs "
                                 "oracle_horizon − 1 backward passes)")
    oracle_rule: str = option("point", "oracle: what is applied from λ̂'s bootstrap over the held-out groups: point "
                              "(λ̂) | interval (λ̂ where its 95% interval excludes 0, else 0) | shrink "
                              "(λ̂·|2P(λ̂ > 0) − 1|)")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if self.regime not in REGIMES:
            raise ValueError(f"unknown regime {self.regime!r}; valid regimes: {', '.join(REGIMES)}")
        if not math.isfinite(self.mtp_scale):
            raise ValueError(f"mtp_scale must be finite, got {self.mtp_scale}")
        if self.occ_estimator not in estimator_rules():
            raise ValueError(f"occ_estimator must be one of {', '.join(estimator_rules())}, got {self.occ_estimator!r}")
        if self.policy_form not in POLICY_FORMS:
            raise ValueError(f"policy_form must be one of {', '.join(POLICY_FORMS)}, got {self.policy_form!r}")
        self._validate_occ_options()
        if not (math.isfinite(self.oracle_bound) and self.oracle_bound > 0):
            raise ValueError(f"oracle_bound must be finite and positive, got {self.oracle_bound}")
        if isinstance(self.oracle_horizon, bool) or not isinstance(self.oracle_horizon, int) or self.oracle_horizon < 1:
            raise ValueError(f"oracle_horizon must be a positive integer, got {self.oracle_horizon!r}")
        if self.oracle_rule not in ORACLE_RULES:
            raise ValueError(f"oracle_rule must be one of {', '.join(ORACLE_RULES)}, got {self.oracle_rule!r}")
        if isinstance(self.oracle_decades, bool) or not isinstance(self.oracle_decades, int) or self.oracle_decades < 0:
            raise ValueError(f"oracle_decades must be a non-negative integer, got {self.oracle_decades!r}")
        if (self.oracle_horizon > 1 or self.oracle_rule != "point" or self.oracle_decades != SEARCH_DECADES) \
                and self.regime != "oracle":
            raise ValueError(f"oracle_horizon, oracle_rule and oracle_decades set the oracle's search: they need "
                             f"regime oracle, "
                             f"got {self.regime!r}")
        if self.mtp_depth < 1:
            raise ValueError(f"mtp_depth must be >= 1, got {self.mtp_depth}")
        if self.mtp_init not in MTP_INITS:
            raise ValueError(f"mtp_init must be one of {', '.join(MTP_INITS)}, got {self.mtp_init!r}")

    def _validate_occ_options(self) -> None:
        """``occ_control`` and ``split_head_loss``: a known value, set only where the regime reads it."""
        if self.occ_control not in OCC_CONTROLS:
            raise ValueError(f"occ_control must be one of {', '.join(OCC_CONTROLS)}, got {self.occ_control!r}")
        if self.occ_control != "none" and not issubclass(REGIMES[self.regime], OCC):
            raise ValueError(f"occ_control={self.occ_control} controls occ's estimate: it needs regime occ or "
                             f"occ-split, got {self.regime!r}")
        if self.split_head_loss not in SPLIT_HEAD_LOSSES:
            raise ValueError(f"split_head_loss must be one of {', '.join(SPLIT_HEAD_LOSSES)}, "
                             f"got {self.split_head_loss!r}")
        if self.split_head_loss != "distill" and self.regime != "occ-split":
            raise ValueError(f"split_head_loss={self.split_head_loss} is occ-split's MTP-module loss: it needs "
                             f"regime occ-split, got {self.regime!r}")

    def make_regime(self, clip: tuple[float, float] = (0.2, 0.2)) -> Regime:
        """The regime object; ``clip`` is the trainer's PPO clip range (policy/occ use it)."""
        options: dict[str, Any] = {"scale": self.mtp_scale}
        if issubclass(REGIMES[self.regime], Policy):
            options.update(form=self.policy_form, clip_low=clip[0], clip_high=clip[1])
        if issubclass(REGIMES[self.regime], OCC):
            options.update(estimator=self.occ_estimator, control=self.occ_control)
        if self.regime == "occ-split":
            options["head_loss"] = self.split_head_loss
        if self.regime == "oracle":
            options.update(bound=self.oracle_bound, horizon=self.oracle_horizon, noise_rule=self.oracle_rule,
                           decades=self.oracle_decades)
        return make_regime(self.regime, **options)


@dataclass(frozen=True)
class InstrumentConfig:
    """What is measured at instrumented updates, and how often (in optimizer/RL steps)."""

    decomp_every: int = option(5, "steps between instrumented updates (0: never)")
    decomp_directions: str = option("active,ce,policy,distill-joint",
                                    "MTP directions measured at each instrumented update; each costs about what "
                                    "the active one does (docs/benchmarks.md; SmolLM2 on CPU: 103–151 s per record "
                                    "with the search)")
    heldout: bool = option(True, "also judge each instrumented update on an independent held-out batch of "
                           "rollouts from the current policy (split 'heldout'; adds J's side per direction "
                           "and sampling the batch)")
    heldout_groups: int = option(0, "prompt groups in each held-out batch, independent of the mini-batch (its "
                                 "precision: standard errors shrink as 1/√groups, J's side costs ∝ groups); 0: as "
                                 "many as the update's mini-batch")
    noise_ceiling: bool = option(False, "also judge each instrumented update on a second, independent held-out "
                                 "batch (split 'heldout2'): the split-half reliability of λ̂, λ*, C and P that "
                                 "`decomp validate` sets beside every estimator (one more split's cost)")
    search: bool = option(True, "find the realized optimum λ̂, and every estimator's realized gain and "
                          "efficiency (real counterfactual steps, forward passes only: 20–44 per searched "
                          "record, the largest part of a record's time)")
    search_splits: str = option("heldout", "splits whose records get the search (comma-separated): 'heldout' "
                                "judges λ̂ and the estimators on held-out rollouts, the ground truth (without "
                                "heldout: 'train'); 'train,heldout' adds the in-sample λ̂ at twice the search's "
                                "cost; with noise_ceiling, 'heldout2' follows 'heldout'")
    realized_dtype: str = option("auto", "dtype of the realized changes and the search: float64 | float32 | auto "
                                 "(float64 for Hugging Face models, whose small steps sit at float32's resolution)")
    hvp_microbatch_rows: int = option(0, "sequences per chunk of J's second-order pass: its gradient and both HVPs "
                                      "are summed over chunks, one chunk's graph alive at a time (less memory, the "
                                      "same numbers up to rounding); 0: auto (the whole batch for the built-in "
                                      f"model, {AUTO_HVP_ROWS} for Hugging Face models)")
    group_errors: bool = option(False, "records carry the sampling errors of their terms from the evaluation "
                                "batch's prompt groups (one pass per split for every direction: reverse mode per "
                                "group or forward mode; reference loop only, where it is on by default)")
    sweep_every: int = option(50, "steps between coefficient sweeps, at the first instrumented update at or "
                              "after each multiple (0: never)")
    curvature_every: int = option(50, "steps between Hessian eigenvalue runs, at the first instrumented update "
                                  "at or after each multiple (0: never)")

    def validate(self) -> None:
        if self.realized_dtype not in ("auto", "float32", "float64"):
            raise ValueError(f"realized_dtype must be auto, float32 or float64, got {self.realized_dtype!r}")
        for name in ("decomp_every", "sweep_every", "curvature_every", "hvp_microbatch_rows", "heldout_groups"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        parse_directions(self.decomp_directions)
        _ = self.searched_splits  # raises on a bad value
        if self.noise_ceiling and not self.heldout:
            raise ValueError("noise_ceiling needs heldout: it evaluates a second held-out batch beside the first")

    @property
    def searched_splits(self) -> tuple[str, ...]:
        """The splits whose records get the realized optimum: ``()`` without ``search``."""
        splits = tuple(s.strip() for s in self.search_splits.split(",") if s.strip())
        if not splits or any(s not in SPLITS for s in splits):
            raise ValueError(f"search_splits must be a comma-separated subset of {', '.join(SPLITS)}, "
                             f"got {self.search_splits!r}")
        if not self.heldout and "heldout" in splits and "train" not in splits:
            splits = ("train",)  # no held-out split to search: the in-sample records are all there is
        if self.noise_ceiling and "heldout" in splits and "heldout2" not in splits:
            splits += ("heldout2",)  # the second held-out batch is searched as the first is
        return splits if self.search else ()

    def hvp_rows(self, real_lm: bool) -> int | None:
        """Sequences per chunk of ``J``'s second-order pass (``None``: the whole batch), where
        ``real_lm`` says the model is a Hugging Face LM."""
        if self.hvp_microbatch_rows:
            return self.hvp_microbatch_rows
        return AUTO_HVP_ROWS if real_lm else None

    @property
    def directions(self) -> tuple[str, ...]:
        return parse_directions(self.decomp_directions)

    def instruments(self, step: int) -> bool:
        """Whether ``step`` (1-based) is instrumented."""
        return self.decomp_every > 0 and step % self.decomp_every == 0

    def due(self, every: int, step: int) -> bool:
        """Whether a sweep or curvature run (period ``every``) happens at instrumented ``step``:
        the first instrumented step at or after each multiple of ``every``, so any two periods
        compose (``every`` need not be a multiple of ``decomp_every``)."""
        if not every or not self.instruments(step):
            return False
        previous = step - self.decomp_every  # the instrumented step before this one (0: none)
        return step // every > previous // every
