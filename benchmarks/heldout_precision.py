"""The held-out size at which ``C`` along the policy direction agrees with itself: split-half
sign agreement against the number of prompt groups, on the built-in model mid-training.

    python benchmarks/heldout_precision.py [--task add|chain] [--seeds 0,1,2] [--step 100]
                                           [--pool 2048] [--target 0.8] [--quick] [--out FILE.md]

Per seed: the reference run (``detach``, the study's ``c = 1``, no instrumentation) is trained to
``--step − 1`` with the reference loop's own parts; at step ``--step`` the training loop's
instrumented update (the last of the step) is rebuilt: its mini-batch, the live AdamW state, and
the shadow ``policy`` direction's updates ``u_RL``, ``δ`` (:class:`decomp.rules.UpdateContext`,
as :func:`decomp.instrument.measure_direction` builds them). A pool of ``--pool`` held-out prompt
groups is drawn from the current policy (:func:`decomp.training.loop.heldout_batch`, chunks with
distinct salts, so independent of the loop's own held-out batch), and every group's unnormalised
contribution to ``C = ⟨∇J, δ⟩``,

    s_g = Σ_{t∈g} M·A·r·(∇ℓ_t·δ)        (C of a batch = Σ_g s_g / Σ_g n_g)

comes from one forward-mode pass per chunk (:func:`decomp.curvature.jvp_logprobs`), checked against
:func:`decomp.evaluation.grouped_side` on the first groups. The sign of a batch's ``C`` is the sign
of ``Σ_g s_g`` (the token count is positive), so the split-half sign agreement at ``G`` groups is

- observed: the share of random pairs of disjoint ``G``-group batches from the pool (without
  replacement, ``2G ≤ pool/4``) whose sums agree in sign;
- predicted: ``sign_agreement_probability(√G·mean(s)/sd(s))`` (:mod:`decomp.reliability`).

``G*``, the groups for agreement ``--target``, is :func:`decomp.reliability.groups_for_sign_agreement`
from the pool's mean and sd, with a 90% percentile interval from resampling the pool. The penalty
``P`` gets the same treatment from ``grouped_side`` on the first ``--penalty-groups`` groups
(predicted only). The cost: :func:`decomp.decomposition.decompose_updates` of the policy direction
on a held-out batch (``J``'s side with the search for ``λ̂``, as the loop's held-out record) at 8
groups (the loop's default: the mini-batch's 64 rollouts) and at ``G*`` groups (capped by
``--cost-cap``, the ratio then extrapolated linearly), timed with ``time.perf_counter``.

Prints a markdown section and writes it to ``--out`` (default ``/tmp/heldout_precision.md``).
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from common import machine, timed

from decomp.curvature import jvp_logprobs
from decomp.decomposition import decompose_updates
from decomp.evaluation import grouped_side
from decomp.instrument import shadow_regimes
from decomp.objectives import RolloutBatch, objectives
from decomp.reliability import groups_for_sign_agreement, sign_agreement_probability
from decomp.rng import stream_seed
from decomp.rules import UpdateContext
from decomp.training.config import TrainConfig
from decomp.training.loop import apply_update, heldout_batch, minibatch_partition, open_run, train_step, update_loss
from decomp.training.policies import rollout
from decomp.training.update import backward

SIZES = (2, 4, 8, 16, 32, 64, 128, 256)
TODAY_GROUPS = 8  # the loop's held-out batch: the mini-batch's 64 rollouts in groups of 8
POOL_SALT = 1000  # heldout_batch salts of the pool's chunks: POOL_SALT + k (the loop uses 0 and 1, 2, ...)
CHUNK_GROUPS = 128


# ---------------------------------------------------------------- split-half sign agreement


def observed_agreement(s: np.ndarray, groups: int, resamples: int, rng: np.random.Generator) -> float:
    """The share of ``resamples`` random pairs of disjoint ``groups``-group batches drawn from the
    pool ``s`` (without replacement) whose sums agree in sign. A zero sum (every group of the
    batch without reward variance: ``C = 0`` exactly) has its sign decided by a fair coin, so a
    pair with a zero counts ½: the agreement is the mean of ``(1 + sign(a)·sign(b))/2``, which is
    what ``sign_agreement_probability`` predicts (½ at no signal)."""
    s = np.asarray(s, dtype=np.float64)
    if 2 * groups > s.size:
        raise ValueError(f"two disjoint batches of {groups} groups need {2 * groups} groups, the pool has {s.size}")
    # argpartition of uniform keys: a uniformly random 2G-subset per row, in random order
    agree = 0.0
    for start in range(0, resamples, 1000):
        n = min(1000, resamples - start)
        keys = rng.random((n, s.size))
        picks = np.argpartition(keys, 2 * groups - 1, axis=1)[:, : 2 * groups]
        rows = s[picks]
        a, b = rows[:, :groups].sum(1), rows[:, groups:].sum(1)
        agree += float(np.sum(1 + np.sign(a) * np.sign(b))) / 2
    return agree / resamples


def predicted_agreement(s: np.ndarray, groups: int) -> float:
    """``sign_agreement_probability(√G·mean/sd)`` from the per-group contributions ``s``."""
    s = np.asarray(s, dtype=np.float64)
    return float(sign_agreement_probability(math.sqrt(groups) * s.mean() / s.std(ddof=1)))


def crossing(sizes: list[int], agreement: list[float], target: float) -> float:
    """The ``G`` where ``agreement`` first reaches ``target``, interpolated linearly in ``log G``
    between grid points (``inf`` if it never does; the first size if it already does there)."""
    for i, (g, a) in enumerate(zip(sizes, agreement, strict=True)):
        if a >= target:
            if i == 0:
                return float(g)
            g0, a0 = sizes[i - 1], agreement[i - 1]
            frac = (target - a0) / (a - a0) if a != a0 else 1.0
            return float(math.exp(math.log(g0) + frac * (math.log(g) - math.log(g0))))
    return math.inf


def groups_interval(s: np.ndarray, target: float, rng: np.random.Generator, resamples: int = 2000,
                    level: float = 0.9) -> tuple[float, float]:
    """A percentile interval of ``G*`` from resampling the pool's groups with replacement."""
    s = np.asarray(s, dtype=np.float64)
    idx = rng.integers(0, s.size, (resamples, s.size))
    boot = s[idx]
    g = np.array([groups_for_sign_agreement(float(m), float(d), target)
                  for m, d in zip(boot.mean(1), boot.std(1, ddof=1), strict=True)])
    lo, hi = np.quantile(g, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# ---------------------------------------------------------------- the reference run at one update


@dataclass
class Update:
    """The instrumented update rebuilt at ``step``: the state, the training mini-batch, the
    policy direction's regime and updates."""

    state: object
    mb: RolloutBatch
    regime: object
    step_updates: object
    accuracy: float
    reward: float
    seconds: dict[str, float] = field(default_factory=dict)


def reference_update(task: str, seed: int, step: int, workdir: Path, log) -> Update:
    cfg = TrainConfig(task=task, seed=seed, mtp_scale=1.0, decomp_every=0, sweep_every=0, curvature_every=0,
                      steps=max(step, 1), eval_every=10**6, checkpoint_every=10**6)
    cfg.validate()
    t0 = time.perf_counter()
    state = open_run(cfg, workdir / f"{task}-s{seed}", resume=False, overwrite=True, cache_dir=None, log=log)
    t_warm = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        reward = math.nan
        for s in range(1, step):
            reward = train_step(state, s)["reward_mean"]
        t_train = time.perf_counter() - t0
        # step `step` as train_step runs it, up to its last update (the one the loop instruments)
        gen = torch.Generator().manual_seed(stream_seed(cfg.seed, step))
        batch, ref_logp, _ = rollout(state.policy, cfg, gen, state.ref_params)
        partition = minibatch_partition(batch.tokens.shape[0], cfg, gen)
        sums = {"pg_loss": 0.0, "mtp_loss": 0.0, "mtp_coef": 0.0, "kl": 0.0, "clip_fraction": 0.0}
        for update, idx in enumerate(partition[:-1]):
            mb = batch.subset(idx)
            mb_ref = None if ref_logp is None else ref_logp[idx]
            out, _, ctx = update_loss(state, step, update, mb, mb_ref)
            backward(state.model, state.optimizer, out, ctx)
            del ctx
            apply_update(state, mb, out, sums)
        idx = partition[-1]
        mb = batch.subset(idx)
        mb_ref = None if ref_logp is None else ref_logp[idx]
        state.optimizer.zero_grad(set_to_none=True)
        regime = shadow_regimes(state.regime, cfg.mtp_scale, cfg.clip)["policy"]
        loss = {"clip": cfg.clip, "kl_coef": cfg.kl_coef, "ref_logp": mb_ref, "rl_loss_of_logp": None}
        ctx = UpdateContext(state.model, mb, state.optimizer, regime, coef=cfg.mtp_scale, scale=cfg.mtp_scale,
                            loss=loss)
        updates = ctx.step()
        accuracy = state.policy.accuracy()
    finally:
        for writer in state.logs.values():
            writer.close()
        state.lock.release()
    return Update(state, mb, regime, updates, accuracy, reward, {"warm_start": t_warm, "train": t_train})


# ---------------------------------------------------------------- per-group contributions


def concat(batches: list[RolloutBatch], group_size: int) -> RolloutBatch:
    """Rollout batches of the same width as one batch (the groups renumbered)."""
    width = max(b.tokens.shape[1] for b in batches)
    if any(b.tokens.shape[1] != width for b in batches):
        raise ValueError("batches of different lengths")
    tokens = torch.cat([b.tokens for b in batches])
    return RolloutBatch(tokens, torch.cat([b.mask for b in batches]), torch.cat([b.advantages for b in batches]),
                        torch.cat([b.old_logp for b in batches]), response_start=batches[0].response_start,
                        groups=torch.arange(tokens.shape[0]) // group_size)


def pool_contributions(u: Update, step: int, pool: int) -> tuple[np.ndarray, np.ndarray, list[RolloutBatch]]:
    """``(s_g, n_g)`` of ``pool`` held-out groups (chunks of :data:`CHUNK_GROUPS`), and the chunks."""
    cfg = u.state.cfg
    params = {k: v.detach() for k, v in u.state.model.named_parameters()}
    delta = u.step_updates.updates.displacement
    s_all, n_all, chunks = [], [], []
    for k in range(-(-pool // CHUNK_GROUPS)):
        groups = min(CHUNK_GROUPS, pool - k * CHUNK_GROUPS)
        chunk = heldout_batch(u.state, step, groups * cfg.group_size, salt=POOL_SALT + k)
        obj = objectives(u.state.model, chunk, u.regime)
        logp, dl = jvp_logprobs(obj.logprob_fn, params, delta, with_value=True)
        with torch.no_grad():
            log_ratio = (logp.double() - chunk.old_logp.double()).clamp(-20, 20)
            weight = chunk.mask.double() * chunk.advantages.double() * torch.exp(log_ratio)
        per_row = (weight * dl.double()).sum(1)
        s_all.append(per_row.reshape(groups, cfg.group_size).sum(1).numpy())
        n_all.append(chunk.mask.double().sum(1).reshape(groups, cfg.group_size).sum(1).numpy())
        chunks.append(chunk)
    return np.concatenate(s_all), np.concatenate(n_all), chunks


def grouped_terms(u: Update, chunk: RolloutBatch, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised ``(c_g, p_g)`` of the first ``groups`` groups of ``chunk`` from
    :func:`grouped_side` (the groups' Terms times the sub-batch's token count)."""
    gs = u.state.cfg.group_size
    sub = chunk.subset(torch.arange(groups * gs))
    obj = objectives(u.state.model, sub, u.regime)
    side = grouped_side(obj.rl_objective, u.step_updates, sub.group_rows(), "autograd", "J held out")
    total = float(sub.mask.sum())
    c = np.array([t.correlation for t in side.group_terms]) * total
    p = np.array([t.penalty for t in side.group_terms]) * total
    return c, p


# ---------------------------------------------------------------- cost


def j_side_seconds(u: Update, batches: dict[str, RolloutBatch], repeats: int) -> dict[str, float]:
    """Median seconds of the held-out record's ``J`` side (decompose_updates with the search) on
    each batch, timed interleaved round-robin after a warm-up (drifting load hits all alike)."""
    def job(batch: RolloutBatch):
        obj = objectives(u.state.model, batch, u.regime).rl_objective
        parts = max(1, -(-batch.tokens.shape[0] // 1024))  # at most 1024 sequences per chunk of the graph
        return lambda: decompose_updates(u.step_updates, obj, search=True, microbatches=parts)

    times = timed({name: job(b) for name, b in batches.items()}, repeats)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ---------------------------------------------------------------- main


def measure(task: str, seed: int, args, workdir: Path, log) -> dict:
    u = reference_update(task, seed, args.step, workdir, log)
    t0 = time.perf_counter()
    s, n, chunks = pool_contributions(u, args.step, args.pool)
    t_pool = time.perf_counter() - t0
    # check: the forward-mode s_g against grouped_side's reverse-mode C_g on the first groups
    check = min(4, chunks[0].tokens.shape[0] // u.state.cfg.group_size)
    c_rev, _ = grouped_terms(u, chunks[0], check)
    check_err = float(np.max(np.abs(c_rev - s[:check])) / max(np.max(np.abs(s[:check])), 1e-30))
    # the penalty on a subset of the pool
    t0 = time.perf_counter()
    p_groups = min(args.penalty_groups, chunks[0].tokens.shape[0] // u.state.cfg.group_size)
    c_sub, p_sub = grouped_terms(u, chunks[0], p_groups) if p_groups >= 2 else (np.zeros(0), np.zeros(0))
    t_penalty = time.perf_counter() - t0
    rng = np.random.default_rng(seed + 17)
    sizes = [g for g in SIZES if 2 * g <= args.pool // 4]
    observed = [observed_agreement(s, g, args.resamples, rng) for g in sizes]
    predicted = [predicted_agreement(s, g) for g in sizes]
    mean, sd = float(s.mean()), float(s.std(ddof=1))
    g_star = groups_for_sign_agreement(mean, sd, args.target)
    interval = groups_interval(s, args.target, rng)
    p_star = groups_for_sign_agreement(float(p_sub.mean()), float(p_sub.std(ddof=1)), args.target) \
        if p_sub.size >= 2 else math.nan
    # cost of the held-out record's J side at 8 groups and at G* (capped), from the pool's rows
    gs = u.state.cfg.group_size
    cost_groups = int(min(max(math.ceil(g_star), TODAY_GROUPS), args.cost_cap, args.pool)) \
        if math.isfinite(g_star) else int(min(args.cost_cap, args.pool))
    pool_batch = concat(chunks, gs)
    times = j_side_seconds(u, {"today": pool_batch.subset(torch.arange(TODAY_GROUPS * gs)),
                               "target": pool_batch.subset(torch.arange(cost_groups * gs))}, args.repeats)
    t8, tg = times["today"], times["target"]
    per_group = tg / cost_groups / (t8 / TODAY_GROUPS)
    cost_ratio = tg / t8 * (g_star / cost_groups if math.isfinite(g_star) and g_star > cost_groups else 1.0) \
        if math.isfinite(g_star) else math.inf
    return {"task": task, "seed": seed, "accuracy": u.accuracy, "reward": u.reward, "mean": mean, "sd": sd,
            "snr_per_group": mean / sd, "pool": s.size, "zero_share": float(np.mean(s == 0)), "tokens_per_group": float(n.mean()),
            "sizes": sizes, "observed": observed, "predicted": predicted,
            "g_star": g_star, "g_star_interval": interval,
            "g_obs": crossing(sizes, observed, args.target), "p_star": p_star, "p_groups": int(p_sub.size),
            "p_snr": float(p_sub.mean() / p_sub.std(ddof=1)) if p_sub.size >= 2 else math.nan,
            "check_err": check_err, "t8": t8, "tg": tg, "cost_groups": cost_groups, "per_group": per_group,
            "cost_ratio": cost_ratio, "seconds": {**u.seconds, "pool": t_pool, "penalty": t_penalty}}


def fmt_g(g: float) -> str:
    if not math.isfinite(g):
        return "∞"
    return f"{g:.0f}" if g >= 10 else f"{g:.1f}"


def report(results: list[dict], args, argv: list[str], minutes: float) -> str:
    lines = [f"## Held-out size for a reproducible sign of C (policy direction, c = 1, step {args.step})", "",
             f"`python benchmarks/heldout_precision.py {shlex.join(argv)}` — {machine()}; {minutes:.1f} min.", "",
             f"Reference run (`detach`, c = 1) trained to step {args.step}; at its instrumented update (the step's "
             f"last), the shadow `policy` direction's δ from the training mini-batch and the live AdamW state. "
             f"A pool of {args.pool} held-out prompt groups (8 rollouts each) from the current policy; per group "
             f"s_g = Σ M·A·r·(∇ℓ·δ) from one forward-mode pass (checked against `grouped_side`). Split-half sign "
             f"agreement at G groups: observed = share of {args.resamples} random pairs of disjoint G-group batches "
             f"from the pool whose C agree in sign (a C of exactly 0 — no group with reward variance — counts ½; "
             f"column s_g = 0: the pool's groups without reward variance); predicted = Φ(z)² + Φ(−z)², z = √G·mean(s)/sd(s). "
             f"G* = groups for agreement {args.target} (`groups_for_sign_agreement`, 90% interval from resampling "
             f"the pool); G*obs = where the observed curve crosses {args.target} (log-linear interpolation; ∞: "
             f"not within the grid). Cost: `decompose_updates` (J side with the search for λ̂, as the loop's "
             f"held-out record) at G* groups over the same at today's {TODAY_GROUPS} groups.", ""]
    sizes = results[0]["sizes"]
    lines.append("| task | seed | acc | s_g = 0 | mean/sd per group | " + " | ".join(f"G={g} obs / pred" for g in sizes)
                 + " | G* [90%] | G*obs | P: G* (groups) | cost at G* / at 8 |")
    lines.append("|" + "---|" * (5 + len(sizes) + 4))
    for r in results:
        cells = " | ".join(f"{o:.3f} / {p:.3f}" for o, p in zip(r["observed"], r["predicted"], strict=True))
        lo, hi = r["g_star_interval"]
        cost = "∞" if not math.isfinite(r["cost_ratio"]) else f"{r['cost_ratio']:.1f}×"
        if math.isfinite(r["g_star"]) and r["g_star"] > r["cost_groups"]:
            cost += f" (extrapolated from {r['cost_groups']} groups)"
        lines.append(f"| {r['task']} | {r['seed']} | {r['accuracy']:.1%} | {r['zero_share']:.0%} | {r['snr_per_group']:+.3f} | {cells} | "
                     f"{fmt_g(r['g_star'])} [{fmt_g(lo)}–{fmt_g(hi)}] | {fmt_g(r['g_obs'])} | "
                     f"{fmt_g(r['p_star'])} ({r['p_groups']}) | {cost} |")
    lines.append("")
    for task in dict.fromkeys(r["task"] for r in results):
        rs = [r for r in results if r["task"] == task]
        gs = [r["g_star"] for r in rs]
        finite = [g for g in gs if math.isfinite(g)]
        med = statistics.median(gs) if gs else math.nan
        lines.append(f"- **{task}**: G* per seed {', '.join(fmt_g(g) for g in gs)}; median {fmt_g(med)}, "
                     f"largest {fmt_g(max(gs))} ({len(rs)} seeds; {len(finite)} finite). Today's {TODAY_GROUPS} "
                     f"groups: predicted agreement "
                     + ", ".join(f"{float(sign_agreement_probability(math.sqrt(TODAY_GROUPS) * r['snr_per_group'])):.2f}"
                                 for r in rs) + ".")
    lines.append("")
    t8 = [r["t8"] for r in results]
    per_group = [r["per_group"] for r in results]
    lines.append(f"J side of the held-out record at {TODAY_GROUPS} groups: median {statistics.median(t8) * 1e3:.0f} ms; "
                 f"per group at the larger size over per group at {TODAY_GROUPS}: median {statistics.median(per_group):.2f} "
                 f"(1 = linear). Forward-mode s_g against `grouped_side`'s C_g: largest relative difference "
                 f"{max(r['check_err'] for r in results):.1e}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="add", help="add | chain | add,chain")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--step", type=int, default=100, help="the instrumented step (mid-training of 200)")
    p.add_argument("--pool", type=int, default=2048, help="held-out prompt groups in the pool")
    p.add_argument("--target", type=float, default=0.8)
    p.add_argument("--resamples", type=int, default=4000)
    p.add_argument("--penalty-groups", type=int, default=128, help="groups of the pool that get P_g")
    p.add_argument("--cost-cap", type=int, default=512, help="largest held-out batch timed (groups)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--quick", action="store_true", help="step 10, pool 256, 1000 resamples, 2 repeats")
    p.add_argument("--out", default="/tmp/heldout_precision.md")
    args = p.parse_args(argv)
    if args.quick:
        args.step, args.pool, args.resamples, args.repeats = min(args.step, 10), min(args.pool, 256), 1000, 2
        args.penalty_groups, args.cost_cap = min(args.penalty_groups, 16), min(args.cost_cap, 64)
    # one thread by default: on a shared 2-core machine two threads per process thrash (measured
    # here: a training step 0.25 s with one thread, 5.9 s with two under a load of 8)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.task.split(","):
            for seed in (int(x) for x in args.seeds.split(",")):
                r = measure(task, seed, args, Path(tmp), log=lambda m: print(m, file=sys.stderr))
                print(f"{task} seed {seed}: acc {r['accuracy']:.1%}, mean/sd {r['snr_per_group']:+.4f}, "
                      f"G* {fmt_g(r['g_star'])} {tuple(round(x, 1) for x in r['g_star_interval'])}, "
                      f"G*obs {fmt_g(r['g_obs'])}, P G* {fmt_g(r['p_star'])}, cost {r['cost_ratio']:.2f}x, "
                      f"check {r['check_err']:.1e}, seconds {({k: round(v, 1) for k, v in r['seconds'].items()})}",
                      file=sys.stderr, flush=True)
                results.append(r)
    text = report(results, args, argv, (time.perf_counter() - start) / 60)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
