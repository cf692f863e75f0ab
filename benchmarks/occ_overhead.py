"""Training-update time with OCC (every estimator that needs no extra pass) over fixed-coefficient
policy loss, on the same batch.

    python benchmarks/occ_overhead.py [--pairs 60]

The default reference-run model, a mini-batch of 64 rollouts, AdamW. Both updates compute the
same forward, backward and step; ``occ`` additionally computes the ``reference``, ``masked`` and
``pooled`` proxy coefficients (it trains with ``masked``) from log-probs the forward already
produced. Reported: the median over interleaved pairs of the ratio of the two updates.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine, synthetic_rollout

from decomp.models.tiny import ModelConfig
from decomp.objectives import aligned_logprobs
from decomp.occ import proxy_coefficients
from decomp.regimes import OCC, Policy
from decomp.rl import clipped_policy_loss
from decomp.training.tasks import VOCAB_SIZE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=60)
    args = ap.parse_args()
    cfg = ModelConfig(vocab_size=VOCAB_SIZE, max_len=11)
    model, batch = synthetic_rollout(cfg, batch=64, seq_len=11, prompt_len=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    r = batch.response
    snapshot = {k: v.detach().clone() for k, v in model.named_parameters()}

    def update(regime, all_estimators: bool):
        main, mtp = model(batch.tokens)
        logp, mtp_logp, valid = aligned_logprobs(main, mtp, batch.tokens)
        mask = batch.mask & valid[0]
        if all_estimators:  # what instrumentation would log every step at no extra pass
            proxy_coefficients(r(mtp_logp[0]).detach(), r(logp).detach(), r(batch.old_logp), r(mask), 0.1)
        term = regime(r(mtp_logp[0]), r(logp), r(batch.old_logp), r(batch.advantages), r(mask))
        loss = clipped_policy_loss(logp, batch.old_logp, batch.advantages, batch.mask) + term.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for k, v in model.named_parameters():
                v.copy_(snapshot[k])

    policy, occ = Policy(scale=0.1), OCC(scale=0.1)
    for _ in range(3):
        update(policy, False)
        update(occ, True)
    ratios, base, other = [], [], []
    for i in range(args.pairs):
        order = [(policy, False), (occ, True)] if i % 2 == 0 else [(occ, True), (policy, False)]
        times = {}
        for regime, extra in order:
            t = time.perf_counter()
            update(regime, extra)
            times[regime.name] = time.perf_counter() - t
        ratios.append(times["occ"] / times["policy"])
        base.append(times["policy"])
        other.append(times["occ"])
    ratios.sort()
    main_, mtp_ = model(batch.tokens)
    logp, mtp_logp, valid = aligned_logprobs(main_, mtp_, batch.tokens)
    args_ = (r(mtp_logp[0]).detach(), r(logp).detach(), r(batch.old_logp), r(batch.mask & valid[0]), 0.1)
    est = []
    for _ in range(200):
        t = time.perf_counter()
        proxy_coefficients(*args_)  # the three proxies; masked is the coefficient occ trains with
        est.append(time.perf_counter() - t)
    print(f"# OCC overhead — {machine()}")
    print(f"{args.pairs} interleaved pairs; policy update {statistics.median(base) * 1e3:.2f} ms, "
          f"occ update (all proxy estimators) {statistics.median(other) * 1e3:.2f} ms")
    q = len(ratios) // 4
    print(f"| occ / policy, paired updates | {statistics.median(ratios):.3f}× [interquartile {ratios[q]:.3f}–{ratios[-q - 1]:.3f}] |")
    extra = statistics.median(est) / statistics.median(base)
    print(f"| 1 + (estimators alone, 200 repeats) / policy update | {1 + extra:.4f}× "
          f"({statistics.median(est) * 1e6:.0f} µs per update) |")


if __name__ == "__main__":
    main()
