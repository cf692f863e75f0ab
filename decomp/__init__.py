"""decomp: exact correlation/penalty decomposition of MTP losses in RLVR, and OCC estimators.

The measurement API (pure functions over a ``dict`` of parameters and callables; the
definitions are in docs/method.md):

- :func:`decomp.decomposition.decompose` — the per-step decomposition (§3), and
  :func:`~decomp.decomposition.measure_step`, which also returns the updates and the realized
  gain ``ΔJ(λ)``; ``search=True`` adds the realized optimum ``λ̂`` and its bootstrap distribution over prompt
  groups (:mod:`decomp.search`);
- :func:`decomp.horizon.measure_horizon` — the ``k``-step realized gain ``ΔJ_k(λ)`` of one update
  continued by ``k − 1`` RL-only updates (:class:`~decomp.horizon.Horizon`), its optimum ``λ̂_k``
  with its interval and the horizon-aware model's ``λ*_k`` (§3.6);
- :mod:`decomp.curvature` — ``hvp``, ``hessian_operator``, ``top_eigenvalues``,
  ``rayleigh_quotient``, ``jvp_logprobs``;
- :mod:`decomp.optim` — counterfactual SGD/AdamW steps;
- :mod:`decomp.occ` — the OCC estimator ladder (§4);
- :mod:`decomp.regimes` — the MTP training regimes (§2).
"""

from decomp.curvature import (
    hessian_operator,
    hvp,
    jvp_logprobs,
    rayleigh_quotient,
    top_eigenvalues,
)
from decomp.decomposition import Decomposition, StepMeasurement, decompose, measure_step
from decomp.horizon import Horizon, HorizonGain, OptimizerSnapshot, measure_horizon
from decomp.occ import (
    efficiency,
    jvp_coefficient,
    masked_coefficient,
    model_efficiency,
    model_gain,
    pooled_coefficient,
    reference_coefficient,
    trust_region_coefficient,
)
from decomp.regimes import make_regime
from decomp.search import bootstrap_optimum, grid_search, realized_optimum

__version__ = "0.1.0"

__all__ = [
    "Decomposition",
    "StepMeasurement",
    "decompose",
    "measure_step",
    "Horizon",
    "HorizonGain",
    "OptimizerSnapshot",
    "measure_horizon",
    "efficiency",
    "model_efficiency",
    "model_gain",
    "realized_optimum",
    "grid_search",
    "bootstrap_optimum",
    "trust_region_coefficient",
    "hessian_operator",
    "hvp",
    "jvp_coefficient",
    "jvp_logprobs",
    "make_regime",
    "masked_coefficient",
    "pooled_coefficient",
    "rayleigh_quotient",
    "reference_coefficient",
    "top_eigenvalues",
]
