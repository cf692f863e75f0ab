"""Cost of one exact decomposition against one training update on the same batch (ratios).

    python benchmarks/decomposition_cost.py [--repeats 7]

The default reference-run model (64 wide, 2 layers, MTP depth 1) on a mini-batch of 64 rollouts
of 11 tokens, float32, AdamW with real state after 3 updates. A training update is forward,
backward and ``optimizer.step()`` of ``−J_clip + c·L_MTP``. The decomposition is
``decompose(J, L_MTP, params, coef=c, optimizer=the live AdamW, rl_loss=the clipped surrogate)``
(and with ``"sgd"``), and the parts it is made of, timed alone; then per direction (``ce``,
``policy``) the in-sample decomposition, the held-out split's extra cost (``J``'s side on another
batch of the same size; the first-order gradients and updates are shared) and the search for the
realized optimum ``λ̂``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import (
    decomposition_rows,
    ground_truth_rows,
    machine,
    print_rows,
    restoring,
    synthetic_rollout,
    timed,
    training_update,
)

from decomp.allocator import reuse_freed_memory
from decomp.models.tiny import ModelConfig
from decomp.objectives import objectives
from decomp.regimes import Policy
from decomp.training.tasks import VOCAB_SIZE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    reuse_freed_memory()  # as `decomp run` does: freed tensors' memory is reused, not refaulted
    cfg = ModelConfig(vocab_size=VOCAB_SIZE, max_len=11)
    model, batch = synthetic_rollout(cfg, batch=64, seq_len=11, prompt_len=7)
    regime = Policy(scale=0.1)
    obj = objectives(model, batch, regime, clip=(0.2, 0.2))
    named = dict(model.named_parameters())
    params = {k: v.detach() for k, v in named.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def update():
        training_update(model, batch, regime, opt)

    for _ in range(3):
        update()
    measured_update = restoring(update, named, opt)  # the measured unit, every repeat at the same point

    _, eval_batch = synthetic_rollout(cfg, batch=64, seq_len=11, prompt_len=7, seed=1)
    fns = decomposition_rows(measured_update, obj, named, opt, sgd_lr=1e-4)
    fns.update(ground_truth_rows(model, batch, eval_batch, named, opt))
    t = timed(fns, args.repeats)
    print(f"# Decomposition cost — {machine()}")
    print(f"model {sum(p.numel() for p in params.values()) / 1e6:.3f}M parameters, batch 64×11, {args.repeats} repeats; "
          "median [min–max] seconds and ratio to the training update of the same repeat\n")
    base = print_rows(t)
    print(f"\nmedian training update {statistics.median(base) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
