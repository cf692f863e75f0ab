"""The MTP training regimes of docs/method.md §2 as small objects.

A regime turns aligned per-token log-probs into the MTP term of the joint loss
``L = −J_clip + λ·L_MTP``:

- ``mtp_logp`` ``m_t``: the MTP head's log-prob of response token ``y_t``;
- ``logp`` ``ℓ_t``: the main head's log-prob now; ``old_logp`` ``ℓ_t^old``: at rollout time;
- ``advantages`` ``A_t`` and the response ``mask`` ``M_t``, all ``[B, T]``.

``regime.detach`` tells the model how to compute ``m_t``: ``"all"`` (MTP inputs and the shared
embedding/head through detached copies: only MTP-exclusive parameters learn), ``"inputs"``
(trunk state and token embeddings detached, the shared head still learns — the reference
patch's ``detach_encoder``), ``"none"`` (full gradient into the shared trunk).

| name            | unit loss ``L_MTP``                         | detach   | λ                  |
|-----------------|---------------------------------------------|----------|--------------------|
| ``detach``      | ``−mean_M m``                               | all      | ``scale``          |
| ``detach-inputs``| ``−mean_M m``                              | inputs   | ``scale``          |
| ``ce``          | ``−mean_M m``                               | none     | ``scale``          |
| ``policy``      | clipped policy loss on ``m`` vs ``ℓ^old``   | none     | ``scale``          |
|                 | (``form="reinforce"``: ``−mean_M A·m``)     |          |                    |
| ``occ``         | as ``policy``                               | none     | OCC estimate (§4)  |
|                 | (``control``: its magnitudes with random    |          |                    |
|                 | signs, or its sign at ``|λ*|``)             |          |                    |
| ``occ-split``   | MTP-exclusive parameters: ``distill`` (or   | all      | ``scale``          |
|                 | ``ce``) at ``scale``; shared ones: ``occ``'s| none     | OCC estimate       |
|                 | term at its estimate                        |          |                    |
| ``frozen``      | as ``detach``, applied at λ = 0; the MTP    | all      | 0                  |
|                 | module is left out of the optimizer         |          |                    |
| ``distill``     | ``−mean_M Σ_v p(v) log q(v)``, ``p`` the    | all      | ``scale``          |
|                 | policy's detached distribution              |          |                    |
| ``distill-joint``| as ``distill`` (shadow direction only)     | none     | ``scale``          |
| ``cosine``      | as ``policy``                               | none     | ``c·max(0, cos)``  |
| ``oracle``      | as ``policy`` (``λ·L_MTP`` for either sign) | none     | held-out ``λ̂``     |

For ``policy``/``occ`` in ratio form the term is computed as the reference implementation does,
``policy_loss(m, ℓ^old, λ·A)``; for ``λ ≥ 0`` this equals ``λ·L_MTP``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from decomp.checks import check_finite, check_number, check_same_shape
from decomp.rl import clipped_policy_loss, cross_entropy_loss, reinforce_loss
from decomp.rules import (
    OCC_CONTROLS,
    ORACLE_RULES,
    CoefficientRule,
    LogprobContext,
    ProxyInputs,
    controlled_rule,
    estimator_rules,
    get_rule,
)
from decomp.search import DEFAULT_SEARCH_BOUND, SEARCH_DECADES

DetachMode = Literal["all", "inputs", "none"]
DETACH_MODES: tuple[str, ...] = ("none", "inputs", "all")
PolicyForm = Literal["ratio", "reinforce"]
DEFAULT_SCALE = 0.1  # verl's mtp_loss_scaling_factor default


@dataclass(frozen=True)
class MTPTerm:
    """The MTP part of one step's loss.

    ``loss`` enters the joint loss as is; ``unit_loss`` is ``L_MTP`` (what
    :func:`decomp.decomposition.decompose` differentiates); ``coef`` is ``λ`` (no gradient).
    """

    loss: Tensor
    unit_loss: Tensor
    coef: float


def check_term_inputs(mtp_logp: Tensor, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> None:
    """The MTP term's inputs have one shape and finite values (a ``ValueError`` names the first that does not)."""
    check_same_shape(mtp_logp=mtp_logp, logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    for name, t in (("mtp_logp", mtp_logp), ("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        check_finite(t.detach(), name)


@dataclass(frozen=True)
class Regime:
    """Base class: a fixed coefficient ``λ = scale`` times a cross-entropy MTP loss."""

    scale: float = DEFAULT_SCALE  # c
    name: ClassVar[str] = "base"
    detach: ClassVar[DetachMode] = "none"
    mtp_input: ClassVar[str] = "logp"  # what the MTP loss reads: "logp" (m) or "distill"
    trains_mtp: ClassVar[bool] = True  # False: the MTP module is not trained during RL

    def __post_init__(self) -> None:
        check_number(self.scale, "scale")

    @property
    def rule(self) -> str | None:
        """The coefficient rule (:mod:`decomp.rules`) that sets ``λ`` at every update, or
        ``None`` when ``λ`` is :meth:`coefficient` (a constant)."""
        return None

    def coefficient_rule(self) -> CoefficientRule | None:
        """The rule a trainer applies at every update (``None`` for a constant ``λ``): the rule
        named :attr:`rule`, or a control of it (:class:`OCC`)."""
        return None if self.rule is None else get_rule(self.rule)

    @property
    def fallback(self) -> float:
        """``λ`` applied where the rule is undefined (``nan``)."""
        return 0.0

    def unit_loss(self, mtp_logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        """``L_MTP`` at unit coefficient."""
        return cross_entropy_loss(mtp_logp, mask)

    def coefficient(self, mtp_logp: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor) -> float:
        """``λ`` for this step."""
        return float(self.scale)

    def applied_unit_loss(
        self, coef: float, mtp_logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor
    ) -> Tensor:
        """The term applied at coefficient ``coef`` divided by ``coef`` (``unit_loss`` at 0).

        Equal to :meth:`unit_loss` except for the ratio-form policy loss at ``coef < 0``, whose
        reference form scales the advantages; this is the loss whose ``coef``-multiple training
        really adds, so a decomposition of the active direction describes the applied step.
        """
        unit = self.unit_loss(mtp_logp, old_logp, advantages, mask)
        if coef == 0:
            return unit
        return self._scaled_loss(coef, mtp_logp, old_logp, advantages, mask, unit) / coef

    def _scaled_loss(
        self, coef: float, mtp_logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, unit: Tensor
    ) -> Tensor:
        return coef * unit

    def __call__(
        self, mtp_logp: Tensor, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor
    ) -> MTPTerm:
        """The MTP term for one step (see :class:`MTPTerm`)."""
        check_term_inputs(mtp_logp, logp, old_logp, advantages, mask)
        coef = self.coefficient(mtp_logp, logp, old_logp, mask)
        return self.term_at(coef, mtp_logp, old_logp, advantages, mask)

    def term_at(self, coef: float, mtp_logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> MTPTerm:
        """The MTP term at a given ``λ = coef`` (e.g. an OCC estimate reduced across ranks)."""
        unit = self.unit_loss(mtp_logp, old_logp, advantages, mask)
        return MTPTerm(self._scaled_loss(coef, mtp_logp, old_logp, advantages, mask, unit), unit, coef)


@dataclass(frozen=True)
class Detach(Regime):
    """CE loss trained only into MTP-exclusive parameters (inputs, embedding and head detached)."""

    name: ClassVar[str] = "detach"
    detach: ClassVar[DetachMode] = "all"


@dataclass(frozen=True)
class DetachInputs(Regime):
    """CE loss with detached MTP inputs; the shared output head still receives its gradient."""

    name: ClassVar[str] = "detach-inputs"
    detach: ClassVar[DetachMode] = "inputs"


@dataclass(frozen=True)
class CrossEntropy(Regime):
    """Plain next-next-token CE on the rollouts, with gradients into the shared trunk."""

    name: ClassVar[str] = "ce"
    detach: ClassVar[DetachMode] = "none"


@dataclass(frozen=True)
class Policy(Regime):
    """The main policy loss applied to the MTP log-probs, with ``ℓ^old`` as old log-prob.

    ``form="ratio"``: the clipped surrogate with ``r = exp(m − ℓ^old)`` (reference behaviour);
    ``form="reinforce"``: ``−mean_M A·m``.
    """

    form: PolicyForm = "ratio"
    clip_low: float = 0.2
    clip_high: float = 0.2
    name: ClassVar[str] = "policy"
    detach: ClassVar[DetachMode] = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.form not in ("ratio", "reinforce"):
            raise ValueError(f"form must be 'ratio' or 'reinforce', got {self.form!r}")
        check_number(self.clip_low, "clip_low", nonnegative=True)
        check_number(self.clip_high, "clip_high", nonnegative=True)

    def unit_loss(self, mtp_logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        if self.form == "reinforce":
            return reinforce_loss(mtp_logp, advantages, mask)
        return clipped_policy_loss(mtp_logp, old_logp, advantages, mask, self.clip_low, self.clip_high)

    def _scaled_loss(
        self, coef: float, mtp_logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, unit: Tensor
    ) -> Tensor:
        if self.form == "reinforce":
            return coef * unit
        # The reference scales the advantages, not the loss; they differ only for λ < 0.
        return clipped_policy_loss(mtp_logp, old_logp, coef * advantages, mask, self.clip_low, self.clip_high)


@dataclass(frozen=True)
class OCC(Policy):
    """Policy loss with ``λ`` set each update by a coefficient rule (docs/estimators.md §4),
    ``scale`` = ``c``: ``estimator`` names any rule of :func:`decomp.rules.estimator_rules` —
    a proxy (``"masked"``, default; ``"reference"``; ``"pooled"``), computed from the log-probs,
    or one that needs the step's updates (``"jvp_masked"``, ``"jvp_pooled"``,
    ``"trust_region"``, ``"exact"``), computed by the trainer from its update context and applied
    with :meth:`term_at`. Where the estimate is undefined ``λ = 0`` is used.

    ``control`` (docs/method.md §2): ``"none"``; ``"random_sign"``, the estimate's magnitudes with
    random signs (does occ's result come from its direction or its smallness?);
    ``"lambda_star_magnitude"``, its sign at the ``exact`` rule's ``|λ*|`` (does its direction help
    at the right size?). A trainer applies :meth:`coefficient_rule`.
    """

    estimator: str = "masked"
    control: str = "none"
    name: ClassVar[str] = "occ"
    detach: ClassVar[DetachMode] = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.estimator not in estimator_rules():
            raise ValueError(
                f"unknown estimator {self.estimator!r}; valid estimators: {', '.join(estimator_rules())}"
            )
        if self.control not in OCC_CONTROLS:
            raise ValueError(f"unknown control {self.control!r}; valid controls: {', '.join(OCC_CONTROLS)}")

    @property
    def rule(self) -> str:
        return self.estimator

    def coefficient_rule(self) -> CoefficientRule:
        """The estimator under :attr:`control` (:func:`decomp.rules.controlled_rule`)."""
        return controlled_rule(self.estimator, self.control)

    def coefficient(self, mtp_logp: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor) -> float:
        if self.control != "none":
            raise ValueError(f"control {self.control!r} needs the update's context: compute λ with "
                             "coefficient_rule() on a decomp.rules.UpdateContext and apply it with term_at")
        rule = get_rule(self.estimator)
        if not rule.needs <= {"logprobs"}:
            raise ValueError(f"estimator {self.estimator!r} needs {rule.described_needs()}: compute it "
                             "from a decomp.rules.UpdateContext and apply it with term_at")
        with torch.no_grad():
            inputs = ProxyInputs(mtp_logp.detach(), logp.detach(), old_logp.detach(), mask)
            lam = rule.value(LogprobContext([inputs], self.scale))
        return self.fallback if math.isnan(lam) else lam


@dataclass(frozen=True)
class Frozen(Detach):
    """The MTP module is not trained during RL (MiMo's practice): ``λ = 0`` and its parameters
    are left out of the optimizer, so they stay exactly as the warm start left them."""

    name: ClassVar[str] = "frozen"
    trains_mtp: ClassVar[bool] = False

    def coefficient(self, mtp_logp: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor) -> float:
        return 0.0


@dataclass(frozen=True)
class Distill(Regime):
    """Soft cross-entropy of the MTP head against the policy's own detached next-token
    distribution for the same token (``mtp_input = "distill"``, :func:`decomp.objectives.
    aligned_distill`): the draft-model objective, fully decoupled from the policy (as SkyRL
    trains its draft head for speculative decoding)."""

    name: ClassVar[str] = "distill"
    detach: ClassVar[DetachMode] = "all"
    mtp_input: ClassVar[str] = "distill"


@dataclass(frozen=True)
class DistillJoint(Distill):
    """:class:`Distill` with its gradient reaching the shared trunk, embedding and head (measured
    as a shadow direction: what joint training of the draft objective would do)."""

    name: ClassVar[str] = "distill-joint"
    detach: ClassVar[DetachMode] = "none"


@dataclass(frozen=True)
class Cosine(Policy):
    """The policy MTP loss gated by gradient similarity (Du et al. 2018, arXiv 1812.02224):
    ``λ = c·max(0, cos(∇J, −∇L_MTP))`` per update on the shared parameters, from one extra
    backward pass (the rule ``cosine`` of :mod:`decomp.rules`); the classic first-order baseline
    for auxiliary losses."""

    name: ClassVar[str] = "cosine"

    @property
    def rule(self) -> str:
        return "cosine"


@dataclass(frozen=True)
class Oracle(Policy):
    """The policy MTP loss at the realized optimum ``λ̂`` of a held-out search at every update
    (:func:`decomp.search.realized_optimum`): not deployable — the upper bound of what
    calibrating ``λ`` in one step can buy. The search runs over ``|λ| ≤ bound``: with a finite
    ``bound`` (a trust region) the constrained optimum is applied, ``±bound`` included; with the
    search's default bound, a gain still rising at it leaves ``λ̂`` undefined. Where ``λ̂`` is
    undefined (that, or no MTP effect) it applies ``fallback``. The term is ``λ·L_MTP`` for either
    sign (not the reference's advantage scaling), so the searched displacement is exactly the
    applied one."""

    fallback: float = 0.0  # a field here: it replaces the base class's constant property
    bound: float = DEFAULT_SEARCH_BOUND
    horizon: int = 1  # k: the realized optimum of the k-step gain (docs/method.md §3.6), on lookahead batches
    noise_rule: str = "point"  # ORACLE_RULES: what the oracle applies given λ̂'s bootstrap distribution
    decades: int = SEARCH_DECADES  # the search grid's decades below ``bound`` (decomp.search)
    name: ClassVar[str] = "oracle"

    def __post_init__(self) -> None:
        super().__post_init__()
        b = check_number(self.bound, "bound")
        if not b > 0:
            raise ValueError(f"bound must be positive, got {self.bound}")
        check_number(self.fallback, "fallback")
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {self.horizon!r}")
        if self.noise_rule not in ORACLE_RULES:
            raise ValueError(f"noise_rule must be one of {', '.join(ORACLE_RULES)}, got {self.noise_rule!r}")
        if isinstance(self.decades, bool) or not isinstance(self.decades, int) or self.decades < 0:
            raise ValueError(f"decades must be a non-negative integer, got {self.decades!r}")

    @property
    def rule(self) -> str:
        return "oracle"

    def _scaled_loss(
        self, coef: float, mtp_logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, unit: Tensor
    ) -> Tensor:
        return coef * unit


SPLIT_HEAD_LOSSES: dict[str, type[Regime]] = {"distill": Distill, "ce": Detach}


@dataclass(frozen=True)
class OCCSplit(OCC):
    """The MTP module and the trunk trained by different terms (docs/method.md §2): the
    MTP-exclusive parameters by the ``head_loss`` regime's term at ``λ = scale`` (``distill``:
    soft cross-entropy against the policy's detached distribution; ``ce``: ``detach``'s
    cross-entropy), as with the trunk detached; the shared parameters (trunk, embeddings, head)
    only by :class:`OCC`'s policy-form term at the estimate ``λ`` (and its ``control``), which
    reaches no MTP-exclusive parameter. So the gradient of one update is, per parameter set,

        shared:         ∇(L_RL + λ·L_MTP^policy)       MTP-exclusive:  c·∇L_head

    The fields, :meth:`unit_loss` and :meth:`term_at` are :class:`OCC`'s (the trunk's term: what
    ``J`` sees, so the active direction of an instrumented update is it); :attr:`head_regime`
    gives the head's term, and a trainer composes the two (:func:`decomp.training.update.backward`).
    """

    head_loss: str = "distill"
    name: ClassVar[str] = "occ-split"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_loss not in SPLIT_HEAD_LOSSES:
            raise ValueError(f"unknown head_loss {self.head_loss!r}; valid: {', '.join(SPLIT_HEAD_LOSSES)}")

    @property
    def head_regime(self) -> Regime:
        """The regime whose term at ``λ = scale`` trains the MTP-exclusive parameters."""
        return SPLIT_HEAD_LOSSES[self.head_loss](scale=self.scale)


REGIMES: dict[str, type[Regime]] = {
    cls.name: cls for cls in (Detach, DetachInputs, CrossEntropy, Policy, OCC, Frozen, Distill, Cosine, Oracle, OCCSplit)
}
SHADOW_ONLY: dict[str, type[Regime]] = {DistillJoint.name: DistillJoint}  # measured, never trained


def register_regime(cls: type[Regime]) -> type[Regime]:
    """Add a regime class to :data:`REGIMES` under its ``name`` (the one place a regime is
    declared: ``--regime``, the config and the loop then accept it); usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Regime)):
        raise TypeError(f"expected a Regime subclass, got {cls!r}")
    if cls.name in REGIMES or cls.name in SHADOW_ONLY or cls.name == Regime.name:
        raise ValueError(f"a regime named {cls.name!r} exists already")
    REGIMES[cls.name] = cls
    return cls


def make_regime(name: str, **options: object) -> Regime:
    """Build a regime by name: ``detach``, ``detach-inputs``, ``ce``, ``policy`` or ``occ``.

    ``options`` are the regime's fields (``scale``; ``form``, ``clip_low``, ``clip_high`` for
    ``policy``/``occ``; ``estimator`` and ``control`` for ``occ``/``occ-split``; ``head_loss`` for
    ``occ-split``).
    """
    if name not in REGIMES:
        raise ValueError(f"unknown regime {name!r}; valid regimes: {', '.join(REGIMES)}")
    cls = REGIMES[name]
    try:
        return cls(**options)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(f"bad option for regime {name!r}: {err}") from None
