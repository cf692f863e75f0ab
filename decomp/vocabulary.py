"""The names every part of decomp shares: directions, splits and terms, defined once.

Imported by the measurement code, the configs, the analysis behind ``decomp plot/validate/report``
and the study's scripts (no torch here: reading run directories needs none of it). Estimators
are coefficient rules, listed by their registry (:func:`decomp.rules.estimator_rules`); regimes
by theirs (:data:`decomp.regimes.REGIMES`).
"""

from __future__ import annotations

# the MTP directions measured at an instrumented update: the run's own, then the shadow ones
DIRECTIONS = ("active", "ce", "policy", "distill-joint")
# the records of an instrumented update: its own batch, held-out rollouts, and (noise_ceiling) a
# second independent held-out batch of the same size
SPLITS = ("train", "heldout", "heldout2")
# the decomposition's terms of ΔJ_MTP = C + X − P (docs/method.md §3.2)
TERMS = ("correlation", "cross", "penalty")
TERM_SYMBOLS = {"correlation": "C", "cross": "X", "penalty": "P"}
