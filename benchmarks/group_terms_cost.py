"""The groups' terms of one update's directions: three ways, timed in one process.

    python benchmarks/group_terms_cost.py [--repeats 7]

The reference run's model and mini-batch (64 rollouts of 11 tokens, AdamW with real state), the
three directions a ``policy`` run measures (``active``, ``ce``, ``distill-joint``; the shadow
``policy`` is a copy), and every group's six terms on one evaluation batch, computed

- by forward mode, one pass per direction (:func:`decomp.evaluation.forward_group_terms`: four
  nested-``jvp`` pairs each; what the loop did before :mod:`decomp.group_terms`);
- by forward mode, one pass carrying every direction's pairs
  (:func:`decomp.evaluation.forward_group_terms_of_steps`);
- by reverse mode, a second-order pass per group built once and shared by the directions, each
  direction's HVPs on it (:func:`decomp.evaluation.grouped_second_order_side`; what the loop did
  on a batch of at most 4 groups);
- by reverse mode per group, one vmapped pass over every direction's tangents
  (:func:`decomp.group_terms.reverse_group_terms`, groups padded to the largest);

on three layouts of the same 64 rows: 4 groups of 16, 8 groups of 8 (a held-out batch), and 16
groups of 1 to 7 (a mini-batch: a random half of 16 groups' rollouts, as the loop's partition
draws it, so the groups are ragged and the vmapped reverse pass pads them). The unit is a training update on the
mini-batch; every row is timed interleaved with it.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import machine, reference_update, restoring, timed, training_update

from decomp.allocator import reuse_freed_memory
from decomp.evaluation import (
    forward_group_terms,
    forward_group_terms_of_steps,
    grouped_second_order_side,
    grouped_side,
)
from decomp.group_terms import reverse_group_terms
from decomp.instrument import shadow_regimes
from decomp.objectives import objectives
from decomp.updates import step_updates


def ragged_groups(rows: int, seed: int = 0) -> list[torch.Tensor]:
    """The rows as a mini-batch of a 2×-larger batch of groups of 8 sees them: each of 2·rows/8
    groups keeps the rows a random half of the batch gave it (empty groups dropped)."""
    gen = torch.Generator().manual_seed(seed)
    owner = torch.randperm(2 * rows, generator=gen)[:rows] // 8  # the group of each kept row
    return [torch.nonzero(owner == g).flatten() for g in range(rows // 4) if bool((owner == g).any())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    reuse_freed_memory()
    cfg, model, batch, regime, opt = reference_update()
    named = dict(model.named_parameters())
    steps = []
    for direction, reg in shadow_regimes(regime, 0.1).items():
        if direction == "policy":
            continue  # the active direction of a policy run
        o = objectives(model, batch, reg, coef=0.1, clip=(0.2, 0.2))
        steps.append(step_updates(o.rl_objective, o.mtp_loss, named, coef=0.1, optimizer=opt, rl_loss=o.rl_loss,
                                  first_order=o.first_order, shared=model.shared_parameter_names(),
                                  rl_grad=steps[0].update_grad if steps else None))  # one RL update, as the loop's
    J = objectives(model, batch, regime).rl_objective
    layouts = {"4 groups of 16": list(torch.arange(64).split(16)), "8 groups of 8": batch.group_rows(),
               "16 ragged groups": ragged_groups(64)}
    theta = {k: v.detach() for k, v in named.items()}

    def shared_passes(rows: list[torch.Tensor]) -> list:
        side = grouped_second_order_side(J, theta, [], rows)
        return [grouped_side(J, s, rows, "forward", "J", side=side).group_terms for s in steps]

    fns = {"training update": restoring(lambda: training_update(model, batch, regime, opt), named, opt)}
    for name, rows in layouts.items():
        fns[f"{name}: forward, a pass per direction"] = lambda rows=rows: [forward_group_terms(J, s, rows, "J")
                                                                            for s in steps]
        fns[f"{name}: forward, one pass"] = lambda rows=rows: forward_group_terms_of_steps(J, steps, rows, "J")
        fns[f"{name}: reverse, a pass per group shared by the directions"] = lambda rows=rows: shared_passes(rows)
        fns[f"{name}: reverse per group, one vmapped pass"] = lambda rows=rows: reverse_group_terms(J, steps, rows)
    t = timed(fns, args.repeats)
    base = t["training update"]
    print(f"# The groups' terms of three directions — {machine()}")
    print(f"{args.repeats} repeats interleaved; median ratio to the training update of the same repeat (median "
          f"{statistics.median(base) * 1e3:.1f} ms); ragged group sizes "
          f"{sorted(len(r) for r in layouts['16 ragged groups'])}\n")
    print("| groups' terms of 3 directions | ms (median) | × training update |")
    print("|---|---|---|")
    for name, ts in t.items():
        if name != "training update":
            ratio = statistics.median(x / b for x, b in zip(ts, base, strict=True))
            print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
