"""What a horizon costs: one direction's k-step measurement by k, as multiples of a training update.

    python benchmarks/horizon_cost.py [--repeats 3] [--horizons 1,2,4,8,20]

The reference run's model (64 wide, 2 layers, MTP depth 1) on a mini-batch of 64 rollouts of 11
tokens in prompt groups of 8, float32, AdamW with real state. The unit is a training update on that
mini-batch (forward, backward, AdamW step). Each row is :func:`decomp.horizon.measure_horizon` for
the ``policy`` direction on a held-out batch of the mini-batch's size (8 groups) with the loop's
default search (20–44 coefficients): the ``λ = 0`` continuation, the horizon-aware model's
forward-mode pass, and ``k − 1`` RL-only updates per evaluated coefficient on ``k − 1`` further
mini-batches. ``k = 1`` is the one-step search with the live optimizer's own steps (§3.5 does it
with counterfactual steps and batched forwards: the ``search`` row of ``decomposition_cost.py``).
Every row and the training update are timed in one process, interleaved.
"""

from __future__ import annotations

import argparse
import statistics

from common import grouped, machine, reference_update, restoring, synthetic_rollout, timed, training_update

from decomp.allocator import reuse_freed_memory
from decomp.horizon import Horizon, OptimizerSnapshot, gradient, measure_horizon, training_rl_loss
from decomp.objectives import objectives


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--horizons", default="1,2,4,8,20", help="the horizons k to time")
    args = ap.parse_args()
    horizons = [int(k) for k in args.horizons.split(",")]
    reuse_freed_memory()
    cfg, model, batch, regime, opt = reference_update()
    named = dict(model.named_parameters())
    theta = {k: v.detach() for k, v in named.items()}
    held = grouped(synthetic_rollout(cfg, batch=64, seq_len=11, prompt_len=7, seed=1)[1])
    future = [grouped(synthetic_rollout(cfg, batch=64, seq_len=11, prompt_len=7, seed=10 + j)[1])
              for j in range(max(horizons))]
    J = objectives(model, held, regime).rl_objective
    rows = held.group_rows()
    tokens = [float(J.mask[r].sum()) for r in rows]
    snapshot = OptimizerSnapshot.of(opt, named)
    first = gradient(training_rl_loss(model, batch, (0.2, 0.2)), theta)
    grad_mtp = gradient(objectives(model, batch, regime, coef=0.1).mtp_loss, theta)
    shared = set(model.shared_parameter_names())
    evaluations: dict[int, list[int]] = {k: [] for k in horizons}

    def measured(k: int):
        losses = tuple(training_rl_loss(model, b, (0.2, 0.2)) for b in future[:k - 1])

        def run() -> None:
            # a fresh Horizon per repeat: it keeps its end points, and a repeat must compute them
            horizon = Horizon(theta, snapshot, first, losses)
            record = measure_horizon(J, horizon, grad_mtp, coef=0.1, row_sets=rows, tokens=tokens, shared=shared)
            evaluations[k].append(record["evaluations_k"])

        return run

    fns = {"training update": restoring(lambda: training_update(model, batch, regime, opt), named, opt)}
    for k in horizons:
        fns[f"k = {k}"] = measured(k)
    t = timed(fns, args.repeats)
    base = t["training update"]
    print(f"# The k-step measurement by horizon — {machine()}")
    print(f"model {sum(p.numel() for p in named.values()) / 1e6:.3f}M parameters, mini-batch 64×11 (8 groups), "
          f"held-out 8 groups, policy direction, {args.repeats} repeats; median ratio to the training update of the "
          f"same repeat (median training update {statistics.median(base) * 1e3:.1f} ms)\n")
    print("| horizon | × training update [min–max] | coefficients evaluated | per coefficient and update |")
    print("|---|---|---|---|")
    for k in horizons:
        ratios = [x / b for x, b in zip(t[f"k = {k}"], base, strict=True)]
        r = statistics.median(ratios)
        n = statistics.median(evaluations[k])
        per = r / (n * max(k - 1, 1))
        print(f"| k = {k} | {r:.0f}× [{min(ratios):.0f}–{max(ratios):.0f}] | {n:.0f} | {per:.2f}× |")


if __name__ == "__main__":
    main()
