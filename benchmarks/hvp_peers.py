"""One exact Hessian-vector product, ours against the methods people already use.

    python benchmarks/hvp_peers.py [--repeats 7]          # time, all methods in one process
    python benchmarks/hvp_peers.py --memory METHOD         # peak memory of one HVP (own process)

Model: the built-in MTP transformer at 0.83M parameters (d_model 128, 3 layers, MTP depth 1),
batch 64×24, float32; function ``−J + 0.1·L_MTP(ce)``; every method under the math SDPA backend
(the fused CPU kernel has no double backward). Each HVP is from scratch (the gradient's graph is
built inside the timed call), as a user calling a single product would run it.

- ``decomp``: ``decomp.curvature.hvp`` (default ``"autograd"``: double backward on leaf copies
  of the functional's parameters);
- ``decomp-reverse`` / ``decomp-forward``: ``hvp(method="reverse")`` (``vjp∘grad`` through
  ``torch.func``) and ``hvp(method="forward")`` (``jvp∘grad``);
- ``double-backward``: PyHessian's method, ``autograd.grad`` with ``create_graph=True`` then the
  gradient of ``⟨∇f, v⟩`` (written here);
- ``curvlinops``: ``curvlinops.HessianLinearOperator(...) @ v`` (``pip install
  curvlinops-for-pytorch``; benchmark only).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from common import machine, summary, synthetic_rollout, timed
from torch.nn.attention import SDPBackend, sdpa_kernel

from decomp.curvature import flatten, hvp
from decomp.models.tiny import ModelConfig
from decomp.objectives import aligned_logprobs
from decomp.rl import cross_entropy_loss, importance_objective

METHODS = ("decomp", "decomp-reverse", "decomp-forward", "double-backward", "curvlinops")


def setup():
    cfg = ModelConfig(vocab_size=16, max_len=24, d_model=128, n_layers=3, n_heads=4, d_mlp=512, mtp_depth=1)
    model, batch = synthetic_rollout(cfg, batch=64, seq_len=24, prompt_len=8)
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}

    def f_of_outputs(logp, mtp_logp, valid):
        return -importance_objective(logp, batch.old_logp, batch.advantages, batch.mask) + 0.1 * cross_entropy_loss(
            mtp_logp[0], batch.mask & valid[0])

    def f(p):
        main, mtp = torch.func.functional_call(model, p, (batch.tokens,))
        return f_of_outputs(*aligned_logprobs(main, mtp, batch.tokens))

    return model, batch, params, v, f, f_of_outputs


def method_fns(model, batch, params, v, f, f_of_outputs):
    def ours():
        return hvp(f, params, v)

    def ours_reverse():
        return hvp(f, params, v, method="reverse")

    def ours_forward():
        return hvp(f, params, v, method="forward")

    live = list(model.parameters())
    vs = [v[k] for k, _ in model.named_parameters()]

    def double_backward():
        with sdpa_kernel(SDPBackend.MATH):
            main, mtp = model(batch.tokens)
            loss = f_of_outputs(*aligned_logprobs(main, mtp, batch.tokens))
            grads = torch.autograd.grad(loss, live, create_graph=True)
            return torch.autograd.grad(grads, live, grad_outputs=vs)

    fns = {"decomp": ours, "decomp-reverse": ours_reverse, "decomp-forward": ours_forward,
           "double-backward": double_backward}
    try:
        from curvlinops import HessianLinearOperator
    except ImportError:
        return fns

    y = torch.stack([batch.mask.float(), batch.advantages, batch.old_logp], dim=-1)

    class Outputs(torch.nn.Module):  # curvlinops wants loss_func(model_func(X), y) with tensors
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, tokens):
            main, mtp = self.inner(tokens)
            logp, mtp_logp, valid = aligned_logprobs(main, mtp, tokens)
            return torch.stack([logp, mtp_logp[0], valid[0].float()], dim=-1)

    wrapped = Outputs()

    class Loss(torch.nn.Module):
        reduction = "mean"  # curvlinops normalises over batches with it (one batch: ×1)

        def forward(self, out, target):
            mask = target[..., 0].bool()
            logp, mtp_logp, valid = out[..., 0], out[..., 1], out[..., 2].bool()
            return -importance_objective(logp, target[..., 2], target[..., 1], mask) + 0.1 * cross_entropy_loss(
                mtp_logp, mask & valid)

    loss_func = Loss()

    def curvlinops_hvp():
        with sdpa_kernel(SDPBackend.MATH):
            op = HessianLinearOperator(wrapped, loss_func, live, [(batch.tokens, y)], check_deterministic=False)
            return op @ vs

    fns["curvlinops"] = curvlinops_hvp
    return fns


def _as_flat(out, names):
    if isinstance(out, dict):
        return flatten(out)
    return torch.cat([t.reshape(-1) for t in out])


def peak_memory(method: str) -> int:
    """Bytes of resident memory one HVP adds at its peak, in a fresh process.

    Run with ``MALLOC_MMAP_THRESHOLD_`` fixed (``run_all.py`` does): glibc then maps every large
    tensor with mmap and unmaps it on free, so resident memory follows the live tensors; a warm-up
    on a small problem loads the lazily imported code first, and the high-water mark is reset
    just before the measured call.
    """
    small = {"x": torch.ones(3)}
    hvp(lambda p: (p["x"] ** 3).sum(), small, small)
    hvp(lambda p: (p["x"] ** 3).sum(), small, small, method="forward")
    parts = setup()
    fns = method_fns(*parts)

    def rss(field: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = rss("VmRSS:")
    fns[method]()
    return rss("VmHWM:") - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--memory", choices=METHODS, default=None)
    args = ap.parse_args()
    if args.memory:
        print(json.dumps({"method": args.memory, "peak_bytes": peak_memory(args.memory)}))
        return
    parts = setup()
    fns = method_fns(*parts)
    model = parts[0]
    names = [k for k, _ in model.named_parameters()]
    reference = _as_flat(fns["decomp"](), names)
    for name, fn in fns.items():  # every method computes the same product
        err = float((_as_flat(fn(), names) - reference).norm() / reference.norm())
        if err > 1e-4:
            sys.exit(f"{name} disagrees with decomp: relative difference {err:.2e}")
    t = timed(fns, args.repeats)
    print(f"# HVP against peers — {machine()}")
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, batch 64×24, {args.repeats} repeats; "
          "median [min–max] and ratio to decomp\n")
    for name, ts in t.items():
        print(f"| {name:<16} | {summary(ts, t['decomp'])} |")


if __name__ == "__main__":
    main()
