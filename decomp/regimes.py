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
from decomp.occ import ESTIMATORS, PROXY_ESTIMATORS, STEP_ESTIMATORS
from decomp.rl import clipped_policy_loss, cross_entropy_loss, reinforce_loss
from decomp.search import DEFAULT_SEARCH_BOUND

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


def _check_inputs(mtp_logp: Tensor, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> None:
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
    needs_gradients: ClassVar[bool] = False  # λ from the RL and MTP gradients (cosine)
    needs_search: ClassVar[bool] = False  # λ from the held-out realized search (oracle)

    def __post_init__(self) -> None:
        check_number(self.scale, "scale")

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
        _check_inputs(mtp_logp, logp, old_logp, advantages, mask)
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
    """Policy loss with ``λ`` set each step by an OCC estimator (docs/method.md §4), ``scale`` = ``c``.

    ``estimator`` is a proxy (``"masked"``, default; ``"reference"``; ``"pooled"``), computed here
    from the log-probs, or one that needs the step's updates (``"jvp_masked"``, ``"jvp_pooled"``,
    ``"trust_region"``), computed by the caller (:func:`decomp.instrument.step_estimate`) and
    applied with :meth:`term_at`. Where the estimate is undefined ``λ = 0`` is used.
    """

    estimator: str = "masked"
    name: ClassVar[str] = "occ"
    detach: ClassVar[DetachMode] = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"unknown estimator {self.estimator!r}; valid estimators: {', '.join(ESTIMATORS)}"
            )

    @property
    def needs_step(self) -> bool:
        """Whether the estimate needs the step's updates (set by the caller with ``term_at``)."""
        return self.estimator in STEP_ESTIMATORS

    def coefficient(self, mtp_logp: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor) -> float:
        if self.needs_step:
            raise ValueError(f"estimator {self.estimator!r} needs the step's updates: compute it with "
                             "decomp.instrument.step_estimate and apply it with term_at")
        with torch.no_grad():
            lam = float(
                PROXY_ESTIMATORS[self.estimator](
                    mtp_logp.detach(), logp.detach(), old_logp.detach(), mask, self.scale
                )
            )
        return 0.0 if math.isnan(lam) else lam


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
    backward pass (:meth:`gated`); the classic first-order baseline for auxiliary losses."""

    name: ClassVar[str] = "cosine"
    needs_gradients: ClassVar[bool] = True

    def gated(self, cosine: float) -> float:
        """``c·max(0, cosine)`` (0 for an undefined cosine)."""
        return self.scale * max(0.0, cosine) if math.isfinite(cosine) else 0.0


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

    fallback: float = 0.0
    bound: float = DEFAULT_SEARCH_BOUND
    name: ClassVar[str] = "oracle"
    needs_search: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        b = check_number(self.bound, "bound")
        if not b > 0:
            raise ValueError(f"bound must be positive, got {self.bound}")
        check_number(self.fallback, "fallback")

    def _scaled_loss(
        self, coef: float, mtp_logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, unit: Tensor
    ) -> Tensor:
        return coef * unit

    def applied(self, coef: float, reason: str) -> tuple[float, bool]:
        """``(λ to apply, whether it is the fallback)`` for a search's ``(λ̂, reason)``."""
        at_bound = bool(reason) and self.bound < DEFAULT_SEARCH_BOUND and math.isfinite(coef) and abs(coef) == self.bound
        if (reason and not at_bound) or not math.isfinite(coef):
            return float(self.fallback), True
        return coef, False


REGIMES: dict[str, type[Regime]] = {
    cls.name: cls for cls in (Detach, DetachInputs, CrossEntropy, Policy, OCC, Frozen, Distill, Cosine, Oracle)
}
SHADOW_ONLY: dict[str, type[Regime]] = {DistillJoint.name: DistillJoint}  # measured, never trained


def make_regime(name: str, **options: object) -> Regime:
    """Build a regime by name: ``detach``, ``detach-inputs``, ``ce``, ``policy`` or ``occ``.

    ``options`` are the regime's fields (``scale``; ``form``, ``clip_low``, ``clip_high`` for
    ``policy``/``occ``; ``estimator`` for ``occ``).
    """
    if name not in REGIMES:
        raise ValueError(f"unknown regime {name!r}; valid regimes: {', '.join(REGIMES)}")
    cls = REGIMES[name]
    try:
        return cls(**options)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(f"bad option for regime {name!r}: {err}") from None
