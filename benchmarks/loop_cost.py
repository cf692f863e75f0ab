"""The cost of instrumentation inside the reference loop, beside the benchmark's own figure.

    python benchmarks/loop_cost.py [--model builtin|smollm2-135m] [--steps 4] [--without-errors]
                                   [--directions active,ce] [--regime policy|ce|detach|occ]

Runs the reference loop (``decomp.training.loop.train``) with every step instrumented, and
reports, from the run's own records, each direction's measurement time as a multiple of the
plain training update the loop timed in the same steps (``update_seconds``): the in-sample
record (``train``: the updates, the shared first-order passes and the jvp estimators included)
and the held-out one (``heldout``: ``J``'s side alone), each split into the search for ``λ̂``
with the estimators' realized gains (``search_seconds``), the jvp estimators' forward-mode
passes (``jvp_seconds``; 0 where forward mode's group-terms pass on the mini-batch gave them
their derivatives, as on the built-in model with sampling errors on) and the rest: on the
first direction's ``train`` record, the decomposition that ``decomposition_cost.py`` times
(``decompose``, the same passes); then the whole instrumented update's extra time over a plain
one (``decomp_seconds``).
The same multiples that ``decomposition_cost.py`` measures in isolation, measured where they
are paid. ``--regime`` trains under another regime (default ``policy``): ``make demo``'s four
measure the same four directions, but ``policy``'s and ``ce``'s active direction is a copy of a
shadow one (three distinct), ``detach``'s moves no parameter ``J`` reads and ``occ``'s is a
fourth.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from common import machine

from decomp.allocator import reuse_freed_memory
from decomp.runlog import read_jsonl
from decomp.training.config import TrainConfig
from decomp.training.loop import train

SETTINGS = {
    "builtin": dict(prompts_per_step=16, group_size=8, steps=6, decomp_every=1, sweep_every=0, curvature_every=0,
                    eval_every=100),
    "smollm2-135m": dict(model="smollm2-135m", task="add1", prompts_per_step=8, group_size=4, steps=2,
                         decomp_every=1, decomp_directions="policy", sweep_every=0, curvature_every=0,
                         eval_every=100, mtp_warmup_steps=20),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin", choices=tuple(SETTINGS))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--without-errors", action="store_true", help="group_errors off (the records' sampling errors "
                    "and λ̂'s distribution), to measure what they add")
    ap.add_argument("--directions", default=None, help="decomp_directions (comma-separated; default: the "
                    "model's setting), to measure what measuring fewer directions saves")
    ap.add_argument("--regime", default="policy", choices=("policy", "ce", "detach", "occ"),
                    help="the run's regime (its active direction): what make demo's runs measure")
    args = ap.parse_args()
    reuse_freed_memory()  # as `decomp run` does: freed tensors' memory is reused, not refaulted
    settings = dict(SETTINGS[args.model])
    if args.steps:
        settings["steps"] = args.steps
    if args.directions:
        settings["decomp_directions"] = args.directions
    cfg = TrainConfig(regime=args.regime, group_errors=not args.without_errors, **settings)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        train(cfg, out, progress=False, log=lambda s: None)
        metrics = [m for m in read_jsonl(out / "metrics.jsonl") if m["step"] > 1]  # step 1 warms up
        records = [r for r in read_jsonl(out / "decomposition.jsonl") if r["step"] > 1 and not r.get("same_as")]
    update = statistics.median(m["update_seconds"] for m in metrics)
    print(f"# Instrumentation inside the loop — {args.model}, {args.regime} run, {machine()}")
    print(f"{len(metrics)} instrumented steps (after one warm-up step), {cfg.prompts_per_step * cfg.group_size} "
          f"sequences per step, {cfg.num_minibatches} updates per step; median plain training update "
          f"{update * 1e3:.1f} ms; ratios to it (median over steps)\n")
    print("| record | whole | of which the search and realized gains | the jvp estimators | the rest: the decomposition |")
    print("|---|---|---|---|---|")
    for direction in cfg.directions:
        for split in ("train", "heldout"):
            rs = [r for r in records if r["direction"] == direction and r["split"] == split]
            if rs:
                whole, search, jvp = (statistics.median(r[k] for r in rs) / update
                                      for k in ("seconds", "search_seconds", "jvp_seconds"))
                rest = statistics.median(r["seconds"] - r["search_seconds"] - r["jvp_seconds"] for r in rs) / update
                print(f"| {direction}, {split} record | {whole:.2f}× | {search:.2f}× | {jvp:.2f}× | {rest:.2f}× |")
    extra = statistics.median(m["decomp_seconds"] for m in metrics)
    print(f"| whole instrumented update, extra over a plain one ({len(cfg.directions)} direction{'s' if len(cfg.directions) != 1 else ''} × 2 splits) | "
          f"{extra / update:.2f}× | | | |")


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
