"""What precision costs: an instrumented update by held-out size, with and without sampling errors.

    python benchmarks/instrumented_cost.py [--repeats 3] [--sizes 1,4,16]

The reference run's model (64 wide, 2 layers, MTP depth 1) on a mini-batch of 64 rollouts of 11
tokens in prompt groups of 8 (8 groups), float32, AdamW with real state. The unit is a training
update on that mini-batch (forward, backward, AdamW step). Each row is one instrumented update as
the loop runs it (:func:`decomp.instrument.instrument_update`: the four directions on the
``train`` and ``heldout`` splits, the search on ``heldout`` as the loop's default, every
estimator, the shared second-order passes, batched jvp estimators), with a held-out batch of 1×, 4× and 16× the mini-batch's groups, without
and with ``group_errors`` (the records' standard errors); then the second held-out batch of
``noise_ceiling`` at 1×. The training update and every row are timed in one process, interleaved.
"""

from __future__ import annotations

import argparse
import statistics

from common import grouped, machine, reference_update, restoring, synthetic_rollout, timed, training_update

from decomp.allocator import reuse_freed_memory
from decomp.instrument import instrument_update
from decomp.objectives import RolloutBatch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="1,4,16", help="held-out sizes as multiples of the mini-batch's groups")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    reuse_freed_memory()
    cfg, model, batch, regime, opt = reference_update()
    named = dict(model.named_parameters())
    held = {k: grouped(synthetic_rollout(cfg, batch=64 * k, seq_len=11, prompt_len=7, seed=k)[1]) for k in sizes}
    second = grouped(synthetic_rollout(cfg, batch=64, seq_len=11, prompt_len=7, seed=99)[1])

    update = restoring(lambda: training_update(model, batch, regime, opt), named, opt)

    def instrumented(eval_batch: RolloutBatch, errors: bool, eval_batch2: RolloutBatch | None = None):
        return lambda: instrument_update(model, batch, opt, regime, scale=0.1, coef=0.1, eval_batch=eval_batch,
                                         eval_batch2=eval_batch2, batched_jvp=True, group_errors=errors,
                                         search_splits=("heldout", "heldout2"))

    fns = {"training update": update}
    for k in sizes:
        fns[f"held-out {k}× ({8 * k} groups)"] = instrumented(held[k], False)
        fns[f"held-out {k}× ({8 * k} groups), group_errors"] = instrumented(held[k], True)
    fns["held-out 1×, group_errors, noise_ceiling"] = instrumented(held[sizes[0]], True, second)
    t = timed(fns, args.repeats)
    base = t["training update"]
    ratio = {k: statistics.median(x / b for x, b in zip(v, base, strict=True)) for k, v in t.items()}
    print(f"# Instrumented update by held-out size — {machine()}")
    print(f"model {sum(p.numel() for p in named.values()) / 1e6:.3f}M parameters, mini-batch 64×11 (8 groups), "
          f"{args.repeats} repeats; median ratio to the training update of the same repeat "
          f"(median training update {statistics.median(base) * 1e3:.1f} ms)\n")
    print("| instrumented update | × training update | group_errors adds |")
    for name, r in ratio.items():
        if name == "training update" or name.endswith("group_errors") or "noise_ceiling" in name:
            continue
        with_errors = ratio[f"{name}, group_errors"]
        print(f"| {name} | {r:.1f}× | |")
        print(f"| {name}, group_errors | {with_errors:.1f}× | {with_errors / r - 1:+.0%} |")
    name = "held-out 1×, group_errors, noise_ceiling"
    print(f"| {name} | {ratio[name]:.1f}× | |")


if __name__ == "__main__":
    main()
