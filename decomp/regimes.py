"""The MTP training regimes of DESIGN.md §2 as small objects.

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
from decomp.occ import PROXY_ESTIMATORS
from decomp.rl import clipped_policy_loss, cross_entropy_loss, reinforce_loss

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
    """Policy loss with ``λ`` set each step by an OCC estimator (DESIGN.md §4), ``scale`` = ``c``.

    ``estimator`` is ``"masked"`` (default), ``"reference"`` or ``"pooled"``. With no response
    tokens the estimate is undefined and ``λ = 0`` is used.
    """

    estimator: str = "masked"
    name: ClassVar[str] = "occ"
    detach: ClassVar[DetachMode] = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.estimator not in PROXY_ESTIMATORS:
            raise ValueError(
                f"unknown estimator {self.estimator!r}; valid estimators: {', '.join(PROXY_ESTIMATORS)}"
            )

    def coefficient(self, mtp_logp: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor) -> float:
        with torch.no_grad():
            lam = float(
                PROXY_ESTIMATORS[self.estimator](
                    mtp_logp.detach(), logp.detach(), old_logp.detach(), mask, self.scale
                )
            )
        return 0.0 if math.isnan(lam) else lam


REGIMES: dict[str, type[Regime]] = {
    cls.name: cls for cls in (Detach, DetachInputs, CrossEntropy, Policy, OCC)
}


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
