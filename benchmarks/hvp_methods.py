"""Time the three exact HVP methods against a training step, in one process (ratios, not seconds).

    python benchmarks/hvp_methods.py [--repeats 7] [--device cpu]

Model: the built-in MTP transformer at d_model=128, 3 layers + 1 MTP depth (~0.8M parameters),
batch 64×24, float32, loss −J + 0.1·L_MTP(ce). Reports the median over repeats (min–max) of:
a training step (forward+backward+AdamW), one HVP by double backward (``autograd``, the
default), by ``vjp∘grad`` (``reverse``) and by ``jvp∘grad`` (``forward``), and one more HVP on an
already-built ``autograd`` graph.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics

import torch
from common import timed

from decomp.curvature import hvp, second_order
from decomp.models.tiny import ModelConfig, MTPTransformer
from decomp.objectives import RolloutBatch, model_logprobs, objectives
from decomp.regimes import CrossEntropy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, max_len=24, d_model=128, n_layers=3, n_heads=4, d_mlp=512, mtp_depth=1)
    model = MTPTransformer(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    B, T = 64, 24
    tokens = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    mask = torch.zeros(B, T - 1, dtype=torch.bool, device=device)
    mask[:, 7:] = True
    adv = torch.randn(B, 1, device=device).expand(B, T - 1) * mask
    with torch.no_grad():
        params = {k: v.detach() for k, v in model.named_parameters()}
        old, _, _ = model_logprobs(model, params, tokens)
    obj = objectives(model, RolloutBatch(tokens, mask, adv, old), CrossEntropy())
    loss = lambda p: -obj.rl_objective(p) + 0.1 * obj.mtp_loss(p)  # noqa: E731
    # training steps run on a copy: they update parameters in place, which would invalidate the
    # HVP graph built once at `params` (autograd refuses to use it after an in-place change)
    trained = copy.deepcopy(model)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-4)
    named = dict(trained.named_parameters())
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def train_step():
        opt.zero_grad()
        loss(named).backward()
        opt.step()

    so = second_order(loss, params)
    timings = timed(
        {
            "training step": train_step,
            "hvp autograd (default)": lambda: hvp(loss, params, v, method="autograd"),
            "hvp reverse (vjp∘grad)": lambda: hvp(loss, params, v, method="reverse"),
            "hvp forward (jvp∘grad)": lambda: hvp(loss, params, v, method="forward"),
            "extra hvp on a built graph": lambda: so.hvp(v),
        },
        args.repeats,
        sync,
    )
    base = statistics.median(timings["training step"])
    print(f"# HVP methods — {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {device}")
    print(f"model {n_params / 1e6:.2f}M parameters, batch {B}×{T}, {args.repeats} repeats\n")
    print(f"| {'measurement':<34} | {'median s':>9} | {'min–max s':>15} | {'× step':>7} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 17}|{'-' * 9}|")
    for name, ts in timings.items():
        med = statistics.median(ts)
        print(f"| {name:<34} | {med:>9.4f} | {min(ts):>7.4f}–{max(ts):<7.4f} | {med / base:>7.2f} |")


if __name__ == "__main__":
    main()
