"""How the exact decomposition's time grows with model width and with tokens per batch.

    python benchmarks/scaling.py [--repeats 3]

``decompose(J, L_MTP, ..., optimizer=AdamW)`` on the built-in model (2 layers, MTP depth 1),
batch 64: three widths (``d_model`` 64, 128, 256 at sequence length 16) and three sequence
lengths (16, 32, 64 at width 128). Reported: median times and the slopes of log(time) against
log(parameters) and log(tokens) from a least-squares line (``numpy.polyfit``); 1 means linear.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from common import machine, synthetic_rollout, timed

from decomp.decomposition import decompose
from decomp.models.tiny import ModelConfig
from decomp.objectives import objectives
from decomp.regimes import Policy


def decomposition_time(width: int, length: int, repeats: int) -> tuple[int, float]:
    cfg = ModelConfig(vocab_size=17, max_len=length, d_model=width, n_layers=2, n_heads=4, d_mlp=4 * width)
    model, batch = synthetic_rollout(cfg, batch=64, seq_len=length, prompt_len=length // 2)
    obj = objectives(model, batch, Policy(scale=0.1))
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    opt.zero_grad()
    (-obj.rl_objective(named) + 0.1 * obj.mtp_loss(named)).backward()
    opt.step()
    t = timed({"d": lambda: decompose(obj.rl_objective, obj.mtp_loss, named, coef=0.1, optimizer=opt)}, repeats)
    return sum(p.numel() for p in named.values()), statistics.median(t["d"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"# Scaling of the exact decomposition — {machine()}\n")
    widths = [decomposition_time(w, 16, args.repeats) + (w,) for w in (64, 128, 256)]
    lengths = [decomposition_time(128, n, args.repeats) + (n,) for n in (16, 32, 64)]
    print("| width | parameters | seconds |")
    print("|---|---|---|")
    for n, t, w in widths:
        print(f"| {w} | {n / 1e6:.2f}M | {t:.4f} |")
    slope_p = np.polyfit(np.log([n for n, _, _ in widths]), np.log([t for _, t, _ in widths]), 1)[0]
    print(f"\nslope of log time against log parameters: {slope_p:.2f}\n")
    print("| sequence length | tokens per batch | seconds |")
    print("|---|---|---|")
    for _, t, n in lengths:
        print(f"| {n} | {64 * n} | {t:.4f} |")
    slope_t = np.polyfit(np.log([64 * n for _, _, n in lengths]), np.log([t for _, t, _ in lengths]), 1)[0]
    print(f"\nslope of log time against log tokens: {slope_t:.2f}")


if __name__ == "__main__":
    main()
