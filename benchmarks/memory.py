"""Peak resident memory of one exact decomposition, and of an instrumented update as the
reference loop runs it, against one training update on the same batch.

    python benchmarks/memory.py                 # runs each measurement in its own process
    python benchmarks/memory.py --one WHAT      # (internal) one measurement: update | decompose | instrumented

The instrumented update is what the loop's peak really is: the update's forward graph is alive
while every direction is decomposed on the train and held-out splits with the search for λ̂.

The default reference-run model at width 128 (3 layers) on a batch of 64×24, float32, AdamW.
Each measurement runs in a fresh process with ``MALLOC_MMAP_THRESHOLD_`` fixed (large tensors
are mapped and unmapped, so resident memory follows live tensors); a warm-up on a small problem
first loads lazily imported code; the high-water mark is reset right before the measured call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from common import (
    instrumented_update,
    smollm2_rollout,
    synthetic_rollout,
    training_update,
)

from decomp.config import InstrumentConfig
from decomp.decomposition import decompose
from decomp.models.tiny import ModelConfig
from decomp.objectives import objectives
from decomp.regimes import Policy


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def one_smollm2(what: str) -> int:
    """As :func:`one` on SmolLM2-135M (16 rollouts × 56 tokens); the warm-up is one of each."""
    model, batch = smollm2_rollout()
    _, eval_batch = smollm2_rollout(seed=1)
    regime = Policy(scale=0.1)
    obj = objectives(model, batch, regime, clip=(0.2, 0.2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    training_update(model, batch, regime, opt)
    named = dict(model.named_parameters())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss("VmRSS:")
    if what == "update":
        training_update(model, batch, regime, opt)
    elif what == "instrumented":  # as the loop runs a Hugging Face model (make demo-real): the policy
        # direction, one second-order graph at a time in chunks of rows, realized changes in float64
        instrumented_update(model, batch, eval_batch, regime, opt, directions=("policy",),
                            realized_dtype=torch.float64, share_second_order=False,
                            hvp_microbatch_rows=InstrumentConfig().hvp_rows(real_lm=True))
    else:
        decompose(obj.rl_objective, obj.mtp_loss, named, coef=0.1, optimizer=opt, rl_loss=obj.rl_loss,
                  first_order=obj.first_order)
    return _rss("VmHWM:") - before


def one(what: str) -> int:
    def build(width, length, batch):
        cfg = ModelConfig(vocab_size=16, max_len=length, d_model=width, n_layers=3, n_heads=4, d_mlp=4 * width)
        model, b = synthetic_rollout(cfg, batch=batch, seq_len=length, prompt_len=8)
        regime = Policy(scale=0.1)
        obj = objectives(model, b, regime, clip=(0.2, 0.2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return model, b, regime, obj, opt

    small = build(16, 12, 8)  # warm-up: imports, allocator, optimizer state creation
    training_update(small[0], small[1], small[2], small[4])
    decompose(small[3].rl_objective, small[3].mtp_loss, dict(small[0].named_parameters()), coef=0.1, optimizer=small[4])
    model, batch, regime, obj, opt = build(128, 24, 64)
    _, eval_batch = synthetic_rollout(model.cfg, batch=64, seq_len=24, prompt_len=8, seed=1)
    named = dict(model.named_parameters())
    training_update(model, batch, regime, opt)  # AdamW state exists before either measurement
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss("VmRSS:")
    if what == "update":
        training_update(model, batch, regime, opt)
    elif what == "instrumented":
        instrumented_update(model, batch, eval_batch, regime, opt, batched_jvp=True)  # as the loop runs it
    else:
        decompose(obj.rl_objective, obj.mtp_loss, named, coef=0.1, optimizer=opt, rl_loss=obj.rl_loss,
                  first_order=obj.first_order)
    return _rss("VmHWM:") - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", choices=("update", "decompose", "instrumented"))
    ap.add_argument("--model", default="builtin", choices=("builtin", "smollm2-135m"))
    args = ap.parse_args()
    if args.one:
        peak = one(args.one) if args.model == "builtin" else one_smollm2(args.one)
        print(json.dumps({"what": args.one, "peak_bytes": peak}))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    peaks = {}
    for what in ("update", "decompose", "instrumented"):
        out = subprocess.run([sys.executable, __file__, "--one", what, "--model", args.model], capture_output=True,
                             text=True, env=env, check=True)
        peaks[what] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    size = "0.83M parameters, batch 64×24" if args.model == "builtin" else "SmolLM2-135M, batch 16×56"
    print(f"# Peak memory of one decomposition vs one training update ({size})\n")
    print(f"| training update | {peaks['update'] / 1e6:.1f} MB |")
    print(f"| decompose (AdamW) | {peaks['decompose'] / 1e6:.1f} MB = {peaks['decompose'] / peaks['update']:.2f}× |")
    what = ("4 directions × 2 splits" if args.model == "builtin" else
            f"the policy direction × 2 splits, J's side in chunks of {InstrumentConfig().hvp_rows(real_lm=True)} "
            "sequences, float64 realized")
    print(f"| instrumented update as the loop runs it ({what}, search) | "
          f"{peaks['instrumented'] / 1e6:.1f} MB = {peaks['instrumented'] / peaks['update']:.2f}× |")


if __name__ == "__main__":
    main()
