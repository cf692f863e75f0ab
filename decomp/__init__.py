"""decomp: exact correlation/penalty decomposition of MTP losses in RLVR, and OCC estimators.

The measurement API (pure functions over a ``dict`` of parameters and callables):

- :func:`decomp.decomposition.decompose` — the per-step decomposition (DESIGN.md §3), and
  :func:`~decomp.decomposition.measure_step`, which also returns the update dicts;
- :mod:`decomp.curvature` — ``hvp``, ``hessian_operator``, ``top_eigenvalues``,
  ``rayleigh_quotient``, ``jvp_logprobs``;
- :mod:`decomp.optim` — counterfactual SGD/AdamW steps;
- :mod:`decomp.occ` — the OCC estimator ladder (DESIGN.md §4);
- :mod:`decomp.regimes` — the MTP training regimes (DESIGN.md §2).
"""

from decomp.curvature import (
    hessian_operator,
    hvp,
    jvp_logprobs,
    rayleigh_quotient,
    top_eigenvalues,
)
from decomp.decomposition import Decomposition, StepMeasurement, decompose, measure_step
from decomp.occ import (
    efficiency,
    gain,
    jvp_coefficient,
    masked_coefficient,
    pooled_coefficient,
    reference_coefficient,
)
from decomp.regimes import make_regime

__version__ = "0.1.0"

__all__ = [
    "Decomposition",
    "StepMeasurement",
    "decompose",
    "measure_step",
    "efficiency",
    "gain",
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
