"""The realized change of ``J`` along a real counterfactual step: ``ΔJ(λ)`` (docs/method.md §3.5)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from decomp.checks import Params
from decomp.curvature import any_attention
from decomp.updates import StepUpdates, moves, same_params

BATCH_MEMORY = 512 * 2**20  # bytes of stacked parameter points (and an equal allowance for their forwards)


class BasePoint(NamedTuple):
    """The evaluation at ``θ + u_RL`` that every ``ΔJ`` of a gain is formed against, with what
    defines it: the directions of one update share ``θ`` and ``u_RL`` (bit for bit, from one RL
    gradient), so their gains on one objective need it once."""

    theta: Params
    update_rl: Params
    shared: frozenset[str] | None
    dtype: torch.dtype | None
    value: Tensor | float  # per-token log-probs (paired objective), else J

    def serves(self, step: StepUpdates, dtype: torch.dtype | None) -> bool:
        """Whether a gain of ``step`` in ``dtype`` (on the same objective) evaluates the same point."""
        return (dtype == self.dtype and step.shared == self.shared and step.updates is not None
                and same_params(step.theta, self.theta) and same_params(step.updates.update_rl, self.update_rl))


class RealizedGain:
    """``ΔJ(λ) = J(θ + u_RL + δ(λ)) − J(θ + u_RL)`` with real counterfactual steps (no gradient).

    For an :class:`~decomp.objectives.ImportanceObjective` the difference is formed token by
    token in float64 from the per-token log-probs at both points (``Σ M·A·r₀·expm1(ℓ − ℓ₀)/Σ M``),
    so it is not limited by the rounding of two nearly equal sums ``J`` (at a real LM's learning
    rate, ΔJ_MTP sits at float32's resolution of ``J``); any other callable gives ``J − J``.
    ``dtype`` (e.g. float64 for a float32 model) evaluates ``J`` at points summed in that dtype.
    ``evaluations`` counts the forward evaluations (the one at ``θ + u_RL`` included).

    Every point is summed into one reused buffer, ``(θ + u_RL) + δ`` in that order (so without
    ``dtype`` the point is bit-identical to the real step's ``θ + u``): no copy of ``θ + u_RL``
    is kept, and in float64 the buffer is the only parameter-sized tensor the evaluations hold.
    Given the step's ``shared`` names (the parameters the policy depends on), only those move:
    ``J`` reads the policy alone, so the MTP module's own parameters stay at ``θ`` (their
    displacements are neither computed nor stacked).

    :meth:`at_coefs` evaluates many coefficients at once: the points ``(θ + u_RL) + δ(λ_k)``
    (the same sums, so the same bits) stacked with ``θ + u_RL`` itself, one forward over the stack
    under :func:`torch.func.vmap` (``batch`` points per forward, at most :data:`BATCH_MEMORY` of
    stacked points and as much again for their forwards; ``batched = False``, or a model that
    ``vmap`` cannot run, evaluates one at a time). Each chunk's ``ΔJ`` is formed against the
    stack's own ``θ + u_RL``, so a batched kernel's rounding cannot enter the difference.
    """

    def __init__(self, objective: Callable[[Params], Tensor], step: StepUpdates, dtype: torch.dtype | None = None,
                 base: BasePoint | None = None) -> None:
        """``base``: another gain's :attr:`base` on the same objective, used where it
        :meth:`~BasePoint.serves` this one (else ``J(θ + u_RL)`` is evaluated here)."""
        self.objective, self.step, self.dtype = objective, step, dtype
        self.paired = callable(getattr(objective, "difference", None))
        # per-token log-probs give each row set's part of ΔJ too (else their parts are nan)
        self.with_parts = self.paired and callable(getattr(objective, "difference_parts", None))
        self._keys = step.reads  # J reads the policy's parameters only
        self._fixed = {k: v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()
                       for k, v in step.theta.items() if k not in self._keys}
        # ∇L_MTP is 0 on every parameter J reads (the detach direction): every u(λ) is u_RL's own
        # arithmetic on the same gradient, so ΔJ(λ) = 0 for every λ, known without a forward (an
        # AdamW δ(λ) recomputed at another λ carries only the decoupled decay's rounding there)
        self.still = not moves(step.grad_mtp, self._keys)
        self._work: list[Tensor] | None = None  # one buffer reused for every point
        self.evaluations = 0
        self.batched = True  # at_coefs through vmap (off by itself when vmap cannot run the model)
        self._seen: dict[float, tuple[float, list[float] | None]] = {}  # at_coefs' values, by coefficient
        if base is not None and base.serves(step, dtype):
            self._base = base.value
        else:
            self._base = self._forward(self._point(step.updates.update_rl, None))

    @property
    def base(self) -> BasePoint:
        """The evaluation at ``θ + u_RL`` and what defines it, for another direction's gain."""
        return BasePoint(self.step.theta, self.step.updates.update_rl, self.step.shared, self.dtype, self._base)

    def _point(self, update: Params | None, delta: Params | None) -> Params:
        """``(θ + update) + delta`` in the buffer (``None``: left out), in ``dtype`` when given:
        one multi-tensor pass per term (at small sizes, launches are the cost)."""
        theta = [self.step.theta[k] for k in self._keys]
        with torch.no_grad():
            if self._work is None:
                self._work = [t.to(self.dtype, copy=True) if self.dtype is not None and t.is_floating_point()
                              else t.clone() for t in theta]
            else:
                torch._foreach_copy_(self._work, theta)
            for term in (update, delta):
                if term is not None:
                    torch._foreach_add_(self._work, [term[k] for k in self._keys])
        return {**self._fixed, **dict(zip(self._keys, self._work, strict=True))}

    def _forward(self, point: Params) -> Tensor | float:
        """The per-token log-probs at ``point`` (paired), else ``J(point)``."""
        # forward only, so the fused attention kernel (faster than the math backend the
        # second-order passes need) — for every evaluation, wherever it is called from: the two
        # kernels differ in the last bit, and ΔJ is a difference
        with torch.random.fork_rng(devices=self.step.devices), any_attention(), torch.no_grad():
            self.evaluations += 1
            return self.objective.logprobs(point) if self.paired else float(self.objective(point))

    def change(self, point: Params) -> float:
        """``J(point) − J(θ + u_RL)``."""
        value = self._forward(point)
        if self.paired:
            return self.objective.difference(value, self._base)
        return value - self._base

    def rl_step(self) -> float:
        """``J(θ + u_RL) − J(θ)``: what the RL step alone gains (one evaluation at ``θ``)."""
        return -self.change(self._point(None, None))

    def at(self, delta: Params) -> float:
        """``ΔJ`` at the displacement ``delta``."""
        if not moves(delta, self._keys):  # the point is θ + u_RL: ΔJ = 0 exactly
            return 0.0
        return self.change(self._point(self.step.updates.update_rl, delta))

    def at_with_parts(self, delta: Params, row_sets: list[Tensor]) -> tuple[float, list[float]]:
        """``ΔJ`` at ``delta`` and, from the same forward, its contributions of disjoint row sets
        (:meth:`decomp.objectives.ImportanceObjective.difference_parts`; ``nan`` for an objective
        that does not expose its per-token log-probs)."""
        if not moves(delta, self._keys):  # the point is θ + u_RL: ΔJ = 0 exactly
            return self._unmoved(row_sets)
        point = self._point(self.step.updates.update_rl, delta)
        value = self._forward(point)
        if not self.with_parts:
            return value - self._base, [math.nan] * len(row_sets)
        return (self.objective.difference(value, self._base),
                self.objective.difference_parts(value, self._base, row_sets))

    @property
    def batch(self) -> int:
        """Points per batched forward: :data:`BATCH_MEMORY` over twice one point's bytes (≥ 1)."""
        moving = (self.step.theta[k] for k in self._keys)
        point = sum(t.numel() * (t.element_size() if self.dtype is None or not t.is_floating_point()
                                 else torch.finfo(self.dtype).bits // 8) for t in moving)
        return max(1, BATCH_MEMORY // (2 * max(point, 1)))

    def at_coefs(self, coefs: Sequence[float], row_sets: Sequence[Tensor] | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """``ΔJ(λ_k)`` for every ``λ_k`` in ``coefs`` (float64 ``[K]``; ``ΔJ(0) = 0`` without
        evaluation) and, with ``row_sets``, each set's contribution ``[K, G]`` (as
        :meth:`at_with_parts`; ``nan`` for an objective without per-token log-probs). A
        coefficient evaluated by an earlier call is not evaluated again (its value is kept:
        e.g. the estimates evaluated in the search's batch, then read one by one); ``row_sets``
        are the same in every call of one gain."""
        coefs = [float(c) for c in coefs]
        totals = np.zeros(len(coefs), dtype=np.float64)
        parts = None if row_sets is None else np.zeros((len(coefs), len(row_sets)), dtype=np.float64)
        todo = sorted({c for c in coefs if c != 0.0 and (c not in self._seen or (
            row_sets is not None and self._seen[c][1] is None))})
        size = self.batch
        for first in range(0, len(todo), size):
            chunk = todo[first:first + size]
            values = [self._unmoved(row_sets)] * len(chunk) if self.still else \
                self._batched(chunk, row_sets) if self.batched and len(chunk) > 1 else None
            if values is None:
                values = [self._one(c, row_sets) for c in chunk]
            self._seen.update(zip(chunk, values, strict=True))
        for i, c in enumerate(coefs):
            if c != 0.0:
                totals[i] = self._seen[c][0]
                if parts is not None:
                    parts[i] = self._seen[c][1]
        return totals, parts

    def _one(self, coef: float, row_sets: Sequence[Tensor] | None) -> tuple[float, list[float] | None]:
        if row_sets is None:
            return self(coef), None
        return self.at_with_parts(self.step.displacement(coef), list(row_sets))

    def _batched(self, coefs: list[float], row_sets: Sequence[Tensor] | None
                 ) -> list[tuple[float, list[float] | None]] | None:
        """One vmapped forward over ``[θ + u_RL, (θ + u_RL) + δ(λ_1), …]``; ``None`` (and
        ``batched`` off) when ``vmap`` cannot run the objective."""
        base = self._point(self.step.updates.update_rl, None)
        with torch.no_grad():
            deltas = self.step.displacements(coefs, self._keys)  # [K, *shape] per parameter, in one pass
            stacked = {}
            for k in self._keys:  # [θ + u_RL, (θ + u_RL) + δ(λ_1), …], written in place
                stacked[k] = base[k].new_empty((len(coefs) + 1, *base[k].shape))
                stacked[k][0] = base[k]
                torch.add(deltas[k].to(base[k].dtype), base[k], out=stacked[k][1:])
        del deltas
        stacked.update(self._fixed)
        in_dims = ({k: 0 if k not in self._fixed else None for k in stacked},)
        fn = self.objective.logprobs if self.paired else self.objective
        try:
            with torch.random.fork_rng(devices=self.step.devices), any_attention(), torch.no_grad(), \
                    warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*performance drop.*")  # a kernel without a batching rule
                out = torch.func.vmap(fn, in_dims=in_dims, randomness="error")(stacked)
        except Exception:  # noqa: BLE001  (vmap cannot batch this model: one at a time from now on)
            self.batched = False
            return None
        self.evaluations += len(coefs) + 1
        if not self.paired:
            return [(float(out[j + 1]) - float(out[0]), None if row_sets is None else [math.nan] * len(row_sets))
                    for j in range(len(coefs))]
        return [(self.objective.difference(out[j + 1], out[0]),
                 None if row_sets is None else
                 self.objective.difference_parts(out[j + 1], out[0], list(row_sets)) if self.with_parts
                 else [math.nan] * len(row_sets)) for j in range(len(coefs))]

    def _unmoved(self, row_sets: Sequence[Tensor] | None) -> tuple[float, Any]:
        """``ΔJ`` and its parts at a point that moves no parameter ``J`` reads: exact zeros."""
        if row_sets is None:
            return 0.0, None
        return 0.0, [0.0 if self.with_parts else math.nan] * len(row_sets)

    def __call__(self, coef: float) -> float:
        return 0.0 if coef == 0.0 or self.still else self.at(self.step.displacement(coef))

    def release(self) -> None:
        """Free the evaluation buffer (parameter-sized; in float64, twice the model's size) until
        the next evaluation allocates it again."""
        self._work = None
