"""How well a noisy measurement can agree with itself: the noise ceiling (docs/estimators.md §5).

Two independent evaluation batches of the same update give two draws of every target (``C``,
``P``, ``λ*``, ``λ̂``). Their agreement (sign agreement, Spearman ρ over a run's records) is the
*split-half reliability*: no estimator can agree with one draw better than the other draw does.
Pure NumPy/SciPy (no torch), so the analysis code that reads run directories can use it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm


def sign_agreement_probability(z: float | np.ndarray) -> float | np.ndarray:
    """``P(sign T₁ = sign T₂)`` for two independent normal estimates of one quantity with
    signal-to-noise ratio ``z = μ/SE``: ``Φ(z)² + Φ(−z)²`` (½ at ``z = 0``, → 1 as ``|z|`` grows)."""
    z = np.asarray(z, dtype=np.float64)
    out = norm.cdf(z) ** 2 + norm.cdf(-z) ** 2
    return float(out) if out.ndim == 0 else out


def groups_for_sign_agreement(mean_per_group: float, sd_per_group: float, target: float = 0.8) -> float:
    """The number of groups ``G`` at which two independent batches of ``G`` groups each agree on
    the sign of a mean with this per-group mean and standard deviation with probability ``target``:
    ``G = (z_target · sd/mean)²`` with ``sign_agreement_probability(z_target) = target``
    (``inf`` for a zero mean)."""
    if not 0.5 < target < 1:
        raise ValueError(f"target must lie in (0.5, 1), got {target}")
    if mean_per_group == 0 or not math.isfinite(mean_per_group):
        return math.inf
    # Φ(z)² + Φ(−z)² = target  ⇔  with p = Φ(z): p² + (1−p)² = target  ⇔  p = (1 + √(2·target − 1))/2
    z = float(norm.ppf((1 + math.sqrt(2 * target - 1)) / 2))
    return (z * sd_per_group / mean_per_group) ** 2


def disattenuated(correlation: float, target_reliability: float, estimator_reliability: float = 1.0) -> float:
    """Spearman's correction for attenuation: ``ρ / √(r_target · r_estimator)``, the correlation
    an estimator would have with a noise-free target (``nan`` where a reliability is not positive).
    An estimator computed from the training batch alone is the same for both held-out batches:
    its reliability is 1."""
    product = target_reliability * estimator_reliability
    if not (math.isfinite(product) and product > 0 and math.isfinite(correlation)):
        return math.nan
    return correlation / math.sqrt(product)
