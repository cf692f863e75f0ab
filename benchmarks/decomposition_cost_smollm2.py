"""Cost of one exact decomposition against one training update, SmolLM2-135M-Instruct (offline).

    python benchmarks/decomposition_cost_smollm2.py [--repeats 2] [--rollouts 16] [--length 56]

A batch of ``--rollouts`` sequences of ``--length`` tokens (random ids, a 40-token prompt, 0/1
rewards), float32, the MTP module attached by copying the last layer, AdamW (lr 1e-6) with real
state after one update. Same measurements as ``decomposition_cost.py``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import (
    decomposition_rows,
    machine,
    print_rows,
    smollm2_rollout,
    timed,
    training_update,
)

from decomp.allocator import reuse_freed_memory
from decomp.config import InstrumentConfig
from decomp.objectives import objectives
from decomp.regimes import Policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rollouts", type=int, default=16)
    ap.add_argument("--length", type=int, default=56)
    args = ap.parse_args()
    reuse_freed_memory()  # as `decomp run` does: freed tensors' memory is reused, not refaulted
    B, T = args.rollouts, args.length
    model, batch = smollm2_rollout(B, T)
    regime = Policy(scale=0.1)
    obj = objectives(model, batch, regime, clip=(0.2, 0.2))
    named = dict(model.named_parameters())
    params = {k: v.detach() for k, v in named.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def update():
        training_update(model, batch, regime, opt)

    update()
    chunks = -(-B // InstrumentConfig().hvp_rows(real_lm=True))  # as the loop runs a Hugging Face model,
    fns = decomposition_rows(update, obj, named, opt, microbatches=chunks, realized_dtype=torch.float64)  # float64 ΔJ
    t = timed(fns, args.repeats)
    print(f"# Decomposition cost, SmolLM2-135M-Instruct — {machine()}")
    print(f"{sum(p.numel() for p in params.values()) / 1e6:.1f}M parameters (with the MTP module), batch {B}×{T}, "
          f"{args.repeats} repeats; median [min–max] seconds and ratio to the training update of the same repeat\n")
    base = print_rows(t)
    print(f"\nmedian training update {statistics.median(base):.2f} s")


if __name__ == "__main__":
    main()
