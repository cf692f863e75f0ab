"""What the study runs: tasks, arms (a regime with its settings), seeds, and the pilot.

Every choice is a constant here, stated and justified in ``figures/STUDY.md``; the pilot that
fixed ``SCALE`` and ``BEST_ESTIMATOR`` is :data:`PILOT`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TASKS = ("add", "chain")
SEEDS = (0, 1, 2, 3, 4)
STEPS = 200
SCALE = 1.0  # c: chosen from the pilot (figures/STUDY.md, "Pilot")
# the deployable estimator the pilot chose by its earlier rule (median realized efficiency, which rewards a
# proxy's magnitude); analysis.pilot now ranks by sign agreement and within-run ρ and reports its choice
BEST_ESTIMATOR = "masked"
FINAL_EVALUATIONS = 5  # final accuracy: the mean of the last 5 held-out evaluations (steps 160–200)

# instrumentation and evaluation shared by every arm: 10 instrumented updates per run (enough for
# early/middle/late thirds), held-out split and realized optimum on each, no sweeps or Lanczos runs
COMMON: dict[str, Any] = {
    "steps": STEPS, "eval_every": 10, "decomp_every": 20, "sweep_every": 0, "curvature_every": 0,
    "checkpoint_every": 20, "heldout": True, "search": True,
}


@dataclass(frozen=True)
class Arm:
    """One configuration of the study: a label (its name in the analysis), a regime and the
    TrainConfig fields that differ from :data:`COMMON`."""

    label: str
    regime: str
    settings: dict[str, Any] = field(default_factory=dict)
    cost: float = 1.0  # relative run time (the progress bar's weights)

    def config(self, task: str, seed: int, common: dict[str, Any]) -> dict[str, Any]:
        return {**common, "mtp_scale": SCALE, **self.settings, "label": self.label, "regime": self.regime,
                "task": task, "seed": seed}


ARMS = (
    Arm("detach", "detach"),
    Arm("frozen", "frozen"),
    Arm("distill", "distill"),
    Arm("ce", "ce"),
    Arm("policy", "policy"),
    Arm("occ", "occ", {"occ_estimator": "reference"}),  # the paper's proxy, as its public code computes it
    Arm(f"occ-{BEST_ESTIMATOR}", "occ", {"occ_estimator": BEST_ESTIMATOR}),
    Arm("cosine", "cosine", cost=1.3),
    Arm("oracle", "oracle", cost=2.2),
    # added after the first oracle collapsed: the same oracle inside a trust region |λ| ≤ 10c
    Arm("oracle-b10", "oracle", {"oracle_bound": 10.0}, cost=2.2),
)
TASK_COST = {"add": 1.0, "chain": 2.2}


@dataclass(frozen=True)
class Design:
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    arms: tuple[Arm, ...]
    common: dict[str, Any]


STUDY = Design(TASKS, SEEDS, ARMS, COMMON)

# "is there any coefficient, chosen with hindsight, that beats detach?" (docs/method.md §2, "Oracles that can
# answer"): the trust-region oracle of the study, its noise-aware rules, and the same over a horizon of 4 updates
# (λ̂_4 on lookahead batches), against detach, five seeds
ORACLE_ARMS = (
    Arm("detach", "detach"),
    Arm("oracle-b10", "oracle", {"oracle_bound": 10.0}, cost=2.2),
    Arm("oracle-b10-interval", "oracle", {"oracle_bound": 10.0, "oracle_rule": "interval"}, cost=2.2),
    Arm("oracle-b10-shrink", "oracle", {"oracle_bound": 10.0, "oracle_rule": "shrink"}, cost=2.2),
    Arm("oracle-b10-k4-interval", "oracle", {"oracle_bound": 10.0, "oracle_rule": "interval", "oracle_horizon": 4},
        cost=8.0),
    # the longest horizon, k = 20, on a grid of 3 decades below the bound (|λ| ∈ {0.01, 0.1, 1, 10}c, then
    # the refinement): each evaluated coefficient costs 19 backward passes and each update 19 lookahead rollout
    # batches, about 8–10 s a step on one core here
    Arm("oracle-b10-k20-interval", "oracle",
        {"oracle_bound": 10.0, "oracle_rule": "interval", "oracle_horizon": 20, "oracle_decades": 3}, cost=30.0),
)
ORACLES = Design(("add",), SEEDS, ORACLE_ARMS, COMMON)

# does occ's result come from its direction or from its smallness, and can the draft head be kept? (issue 21,
# second edition): the paper's proxy (occ's reference estimator) as is, with random signs at its magnitudes, at
# λ*'s magnitude with its sign, and occ-split (the MTP module trained by distill at c, the trunk by occ's λ);
# detach and frozen place the draft acceptance of a trained and of an untrained head
CONTROL_ARMS = (
    Arm("detach", "detach"),
    Arm("frozen", "frozen"),
    Arm("occ", "occ", {"occ_estimator": "reference"}),
    Arm("occ-random-sign", "occ", {"occ_estimator": "reference", "occ_control": "random_sign"}),
    Arm("occ-star-magnitude", "occ", {"occ_estimator": "reference", "occ_control": "lambda_star_magnitude"},
        cost=1.5),
    Arm("occ-split", "occ-split", {"occ_estimator": "reference"}, cost=1.3),
)
CONTROLS = Design(("add",), SEEDS, CONTROL_ARMS, COMMON)

# the pilot: where does the MTP term matter? ce and policy at three scales against detach, two
# seeds per task, shorter runs; its held-out records also rank the estimators
PILOT_SCALES = (0.1, 1.0, 10.0)
PILOT = Design(
    TASKS, (0, 1),
    (Arm("detach", "detach"),
     *(Arm(f"{r}-c{c:g}", r, {"mtp_scale": c}) for r in ("ce", "policy") for c in PILOT_SCALES)),
    {**COMMON, "steps": 100, "decomp_every": 20, "checkpoint_every": 20},
)
