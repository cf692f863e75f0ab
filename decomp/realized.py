"""The realized change of ``J`` along a real counterfactual step: ``ΔJ(λ)`` (docs/method.md §3.5)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from decomp.checks import Params
from decomp.curvature import any_attention
from decomp.updates import StepUpdates


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
    """

    def __init__(self, objective: Callable[[Params], Tensor], step: StepUpdates, dtype: torch.dtype | None = None) -> None:
        self.objective, self.step, self.dtype = objective, step, dtype
        self.paired = callable(getattr(objective, "difference", None))
        self._keys = list(step.theta)
        self._work: list[Tensor] | None = None  # one buffer reused for every point
        self.evaluations = 0
        self._base = self._forward(self._point(step.updates.update_rl, None))

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
        return dict(zip(self._keys, self._work, strict=True))

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
        return self.change(self._point(self.step.updates.update_rl, delta))

    def at_with_parts(self, delta: Params, row_sets: list[Tensor]) -> tuple[float, list[float]]:
        """``ΔJ`` at ``delta`` and, from the same forward, its contributions of disjoint row sets
        (:meth:`decomp.objectives.ImportanceObjective.difference_parts`; ``nan`` for an objective
        that does not expose its per-token log-probs)."""
        point = self._point(self.step.updates.update_rl, delta)
        value = self._forward(point)
        if not (self.paired and callable(getattr(self.objective, "difference_parts", None))):
            return value - self._base, [math.nan] * len(row_sets)
        return (self.objective.difference(value, self._base),
                self.objective.difference_parts(value, self._base, row_sets))

    def __call__(self, coef: float) -> float:
        return 0.0 if coef == 0.0 else self.at(self.step.displacement(coef))

    def release(self) -> None:
        """Free the evaluation buffer (parameter-sized; in float64, twice the model's size) until
        the next evaluation allocates it again."""
        self._work = None
