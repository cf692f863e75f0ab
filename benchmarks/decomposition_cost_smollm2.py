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
from common import decomposition_rows, machine, print_rows, timed, training_update

from decomp.models.hf import attach_mtp
from decomp.objectives import RolloutBatch, aligned_logprobs, objectives
from decomp.regimes import Policy
from decomp.rl import group_advantages
from decomp.training.policies import load_hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rollouts", type=int, default=16)
    ap.add_argument("--length", type=int, default=56)
    args = ap.parse_args()
    lm, _ = load_hf("smollm2-135m")
    model = attach_mtp(lm, depth=1)
    gen = torch.Generator().manual_seed(0)
    B, T, P = args.rollouts, args.length, 40
    tokens = torch.randint(0, lm.config.vocab_size, (B, T), generator=gen)
    mask = torch.zeros(B, T - 1, dtype=torch.bool)
    mask[:, P - 1 :] = True
    adv = group_advantages((torch.rand(B, generator=gen) < 0.5).float(), 4)[:, None] * mask
    with torch.no_grad():
        main, mtp = model(tokens)
        old, _, _ = aligned_logprobs(main, mtp, tokens)
    batch = RolloutBatch(tokens, mask, adv, old, response_start=P - 1)
    regime = Policy(scale=0.1)
    obj = objectives(model, batch, regime, clip=(0.2, 0.2))
    named = dict(model.named_parameters())
    params = {k: v.detach() for k, v in named.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def update():
        training_update(model, batch, regime, opt)

    update()
    fns = decomposition_rows(update, obj, named, opt)
    t = timed(fns, args.repeats)
    print(f"# Decomposition cost, SmolLM2-135M-Instruct — {machine()}")
    print(f"{sum(p.numel() for p in params.values()) / 1e6:.1f}M parameters (with the MTP module), batch {B}×{T}, "
          f"{args.repeats} repeats; median [min–max] seconds and ratio to the training update of the same repeat\n")
    base = print_rows(t)
    print(f"\nmedian training update {statistics.median(base):.2f} s")


if __name__ == "__main__":
    main()
