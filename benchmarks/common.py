"""Shared pieces of the benchmarks: a real rollout batch of the default model, timing helpers."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch

from decomp.models.tiny import ModelConfig, MTPTransformer
from decomp.objectives import RolloutBatch, model_logprobs
from decomp.rl import group_advantages


def machine() -> str:
    return (f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def timed(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Each callable ``repeats`` times, interleaved round-robin (drifting load hits all alike),
    after one warm-up call each."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            out[name].append(time.perf_counter() - t)
    return out


def summary(ts: list[float], base: list[float] | None = None) -> str:
    med = statistics.median(ts)
    text = f"{med:.4f} s [{min(ts):.4f}–{max(ts):.4f}]"
    if base is not None:
        ratios = sorted(t / b for t, b in zip(ts, base, strict=True))
        text += f" = {statistics.median(ratios):.2f}× [{ratios[0]:.2f}–{ratios[-1]:.2f}]"
    return text


def synthetic_rollout(cfg: ModelConfig, batch: int, seq_len: int, prompt_len: int, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> tuple[MTPTransformer, RolloutBatch]:
    """A model and a rollout-shaped batch (random tokens, 0/1 rewards in groups of 8)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MTPTransformer(cfg).to(dtype).eval()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    mask = torch.zeros(batch, seq_len - 1, dtype=torch.bool)
    mask[:, prompt_len - 1 :] = True
    rewards = (torch.rand(batch, generator=gen) < 0.5).to(dtype)
    adv = group_advantages(rewards, 8)[:, None] * mask
    with torch.no_grad():
        params = {k: v.detach() for k, v in model.named_parameters()}
        old, _, _ = model_logprobs(model, params, tokens)
    return model, RolloutBatch(tokens, mask, adv, old, response_start=prompt_len - 1)


def smollm2_rollout(rollouts: int = 16, length: int = 56, prompt: int = 40, seed: int = 0):
    """SmolLM2-135M-Instruct (offline, float32) with an MTP module copied from its last layer, and
    a rollout-shaped batch of random ids (a ``prompt``-token prompt, 0/1 rewards in groups of 4)."""
    from decomp.models.hf import attach_mtp
    from decomp.objectives import aligned_logprobs
    from decomp.training.policies import load_hf

    lm, _ = load_hf("smollm2-135m")
    model = attach_mtp(lm, depth=1)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, lm.config.vocab_size, (rollouts, length), generator=gen)
    mask = torch.zeros(rollouts, length - 1, dtype=torch.bool)
    mask[:, prompt - 1 :] = True
    adv = group_advantages((torch.rand(rollouts, generator=gen) < 0.5).float(), 4)[:, None] * mask
    with torch.no_grad():
        main, mtp = model(tokens)
        old, _, _ = aligned_logprobs(main, mtp, tokens)
    return model, RolloutBatch(tokens, mask, adv, old, response_start=prompt - 1)


def _backward(model, batch: RolloutBatch, regime, opt: torch.optim.Optimizer, clip: float) -> float:
    """An update's forward for both heads (the clipped surrogate plus the regime's MTP term) and its
    backward; returns the applied ``λ``."""
    from decomp.objectives import aligned_logprobs
    from decomp.rl import clipped_policy_loss

    kwargs = {} if batch.attention_mask is None else {"attention_mask": batch.attention_mask}
    main, mtp = model(batch.tokens, detach=regime.detach, **kwargs)
    logp, mtp_logp, valid = aligned_logprobs(main, mtp, batch.tokens)
    r = batch.response
    pg = clipped_policy_loss(logp, batch.old_logp, batch.advantages, batch.mask, clip, clip)
    term = regime(r(mtp_logp[0]), r(logp), r(batch.old_logp), r(batch.advantages), r(batch.mask & valid[0]))
    opt.zero_grad()
    (pg + term.loss).backward()
    return term.coef


def training_update(model, batch: RolloutBatch, regime, opt: torch.optim.Optimizer, clip: float = 0.2) -> None:
    """One update exactly as ``decomp.training.loop`` runs it: one forward for both heads, the clipped
    surrogate plus the regime's MTP term, backward, AdamW step."""
    _backward(model, batch, regime, opt, clip)
    opt.step()


def restoring(update: Callable[[], object], named: dict, opt: torch.optim.Optimizer) -> Callable[[], None]:
    """``update`` followed by restoring the parameters and the optimizer state it changed, so
    that every repeat of a timed update starts from the same point (snapshot taken now)."""
    snapshot = {k: v.detach().clone() for k, v in named.items()}
    state = {k: {s: t.clone() for s, t in st.items()} for k, st in opt.state.items()}

    def restored() -> None:
        update()
        with torch.no_grad():
            for k, v in named.items():
                v.copy_(snapshot[k])
        for p, st in opt.state.items():
            for s, t in st.items():
                t.copy_(state[p][s])

    return restored


def instrumented_update(model, batch: RolloutBatch, eval_batch: RolloutBatch, regime,
                        opt: torch.optim.Optimizer, clip: float = 0.2, directions=None,
                        realized_dtype: torch.dtype | None = None, share_second_order: bool = True,
                        hvp_microbatch_rows: int | None = None, batched_jvp: bool = False) -> None:
    """An instrumented update as ``decomp.training.loop`` runs it: the update's forward and
    backward, :func:`decomp.instrument.instrument_update` with the held-out split and the search
    (before the step it measures), then the AdamW step."""
    from decomp.vocabulary import DIRECTIONS
    from decomp.instrument import instrument_update

    coef = _backward(model, batch, regime, opt, clip)
    instrument_update(model, batch, opt, regime, scale=regime.scale, coef=coef, clip=(clip, clip),
                      directions=DIRECTIONS if directions is None else directions, eval_batch=eval_batch,
                      realized_dtype=realized_dtype, share_second_order=share_second_order,
                      hvp_microbatch_rows=hvp_microbatch_rows, batched_jvp=batched_jvp)
    opt.step()


def decomposition_rows(
    update: Callable[[], object], obj, named: dict, opt: torch.optim.Optimizer, *, sgd_lr: float | None = None,
    microbatches: int = 1, realized_dtype: torch.dtype | None = None,
) -> dict[str, Callable[[], object]]:
    """The decomposition-cost measurements on one batch: a training update (the unit), one full
    ``decompose`` (AdamW; SGD too given ``sgd_lr``; with ``microbatches > 1`` also as the loop
    runs a real LM: ``J``'s side in that many row chunks, the realized changes in
    ``realized_dtype``) and the parts it is made of, timed alone."""
    from decomp.curvature import jvp_logprobs, jvp_logprobs_batched, second_order
    from decomp.decomposition import decompose

    params = {k: v.detach() for k, v in named.items()}
    vec = {k: torch.randn_like(p) for k, p in params.items()}
    rows: dict[str, Callable[[], object]] = {
        "training update": update,
        "decompose, AdamW": lambda: decompose(obj.rl_objective, obj.mtp_loss, named, coef=0.1, optimizer=opt,
                                              rl_loss=obj.rl_loss, first_order=obj.first_order),
    }
    if microbatches > 1:
        in_dtype = "" if realized_dtype is None else f", realized in {str(realized_dtype).removeprefix('torch.')}"
        rows[f"decompose, AdamW, J side in {microbatches} chunks{in_dtype}"] = lambda: decompose(
            obj.rl_objective, obj.mtp_loss, named, coef=0.1, optimizer=opt, rl_loss=obj.rl_loss,
            first_order=obj.first_order, microbatches=microbatches, realized_dtype=realized_dtype)
    if sgd_lr is not None:
        rows["decompose, SGD"] = lambda: decompose(obj.rl_objective, obj.mtp_loss, params, coef=0.1, lr=sgd_lr,
                                                   rl_loss=obj.rl_loss, first_order=obj.first_order)
    from decomp import optim as cf_optim
    from decomp.updates import shared_first_order

    cf = cf_optim.from_torch(opt, named)
    grads = {k: torch.randn_like(p) for k, p in params.items()}

    def two_hvps():
        so = second_order(obj.rl_objective, params)
        so.hvp(vec)
        so.hvp(grads)

    rows.update({  # the passes a decomposition is made of, each timed alone: the floor is their sum
        "  ∇L_MTP and ∇L_RL (one forward)": lambda: shared_first_order(obj.first_order, params),
        "  ∇L_MTP alone": lambda: torch.func.grad(obj.mtp_loss)(params),
        "  ∇J + graph for HVPs": lambda: second_order(obj.rl_objective, params),
        "  ∇J + graph + one HVP": lambda: second_order(obj.rl_objective, params).hvp(vec),
        "  ∇J + graph + two HVPs": two_hvps,
        "  counterfactual AdamW (u_RL, δ, δ₁)": lambda: cf.counterfactual(params, grads, vec, 0.1),
        "  J forward": lambda: obj.rl_objective(params),
        # not part of a decomposition: the jvp estimators, two ways (decomp.rules.UpdateContext.jvp)
        "  jvp estimators: two passes": lambda: (jvp_logprobs(obj.logprob_fn, params, vec),
                                                  jvp_logprobs(obj.logprob_fn, params, grads, with_value=True)),
        "  jvp estimators: one pass, both tangents": lambda: jvp_logprobs_batched(obj.logprob_fn, params, [vec, grads]),
    })
    return rows


def ground_truth_rows(model, batch, eval_batch, named: dict, opt: torch.optim.Optimizer,
                      scale: float = 0.1) -> dict[str, Callable[[], object]]:
    """Per direction (``ce``, ``policy``): the in-sample decomposition, the held-out split's
    extra cost (``J``'s side only: the updates are shared) and the realized-optimum search."""
    from decomp.decomposition import decompose_updates
    from decomp.updates import step_updates
    from decomp.objectives import objectives
    from decomp.regimes import CrossEntropy, Policy
    from decomp.realized import RealizedGain
    from decomp.search import realized_optimum

    rows: dict[str, Callable[[], object]] = {}
    for name, regime in (("ce", CrossEntropy(scale=scale)), ("policy", Policy(scale=scale))):
        obj = objectives(model, batch, regime, coef=scale, clip=(0.2, 0.2))
        held = objectives(model, eval_batch, regime)
        step = step_updates(obj.rl_objective, obj.mtp_loss, named, coef=scale, optimizer=opt, rl_loss=obj.rl_loss,
                            first_order=obj.first_order)
        measured = decompose_updates(step, obj.rl_objective)

        def in_sample(obj=obj):
            s = step_updates(obj.rl_objective, obj.mtp_loss, named, coef=scale, optimizer=opt, rl_loss=obj.rl_loss,
                             first_order=obj.first_order)
            return decompose_updates(s, obj.rl_objective)

        def search(m=measured):  # a fresh gain: one that has evaluated a coefficient keeps its value
            return realized_optimum(RealizedGain(m.gain.objective, m.step, m.gain.dtype))

        rows[f"{name}: decomposition, in-sample"] = in_sample
        rows[f"{name}:   + held-out split (J side)"] = lambda step=step, held=held: decompose_updates(step, held.rl_objective)
        rows[f"{name}:   + search for λ̂"] = search
    return rows


def print_rows(t: dict[str, list[float]]) -> list[float]:
    """One table row per measurement, as a ratio to the training update of the same repeat; then
    the floor (:func:`print_floor`) when the parts were timed."""
    base = t["training update"]
    for name, ts in t.items():
        print(f"| {name:<26} | {summary(ts, base)} |")
    if FLOOR_PARTS[0] in t:
        print_floor(t, base)
    return base


# the passes an AdamW decomposition cannot share: the first-order gradients (one forward, two
# backward), J's gradient with its graph and both HVPs through it, the counterfactual steps, and
# three forward evaluations of J (at θ, θ + u_RL and θ + u_RL + δ) for the realized changes
FLOOR_PARTS = ("  ∇L_MTP and ∇L_RL (one forward)", "  ∇J + graph + two HVPs", "  counterfactual AdamW (u_RL, δ, δ₁)",
               "  J forward")
FLOOR_WEIGHTS = (1, 1, 1, 3)


def print_floor(t: dict[str, list[float]], base: list[float]) -> float:
    """The floor (the sum of the parts' median ratios, :data:`FLOOR_PARTS`) and what the full
    AdamW decomposition spends above it."""
    ratio = {k: statistics.median(x / b for x, b in zip(t[k], base, strict=True)) for k in (*FLOOR_PARTS,
                                                                                           "decompose, AdamW")}
    floor = sum(w * ratio[k] for k, w in zip(FLOOR_PARTS, FLOOR_WEIGHTS, strict=True))
    print(f"| floor: first order + ∇J, graph, two HVPs + counterfactual + 3 J forwards | {floor:.2f}× |")
    print(f"| decompose, AdamW, above the floor | {ratio['decompose, AdamW'] - floor:.2f}× |")
    return floor


GROUP = 8  # rollouts per prompt group in the benchmarks' batches


def grouped(batch: RolloutBatch) -> RolloutBatch:
    """``batch`` with its prompt groups (consecutive rows of :data:`GROUP`)."""
    groups = torch.arange(batch.tokens.shape[0]) // GROUP
    return RolloutBatch(batch.tokens, batch.mask, batch.advantages, batch.old_logp, batch.response_start,
                        groups=groups)


def reference_update(updates: int = 3):
    """The reference run's model (64 wide, 2 layers, MTP depth 1), its grouped mini-batch of 64
    rollouts of 11 tokens, the ``policy`` regime at c = 0.1 and an AdamW that has taken ``updates``
    updates: ``(cfg, model, batch, regime, optimizer)``."""
    from decomp.regimes import Policy
    from decomp.training.tasks import VOCAB_SIZE

    cfg = ModelConfig(vocab_size=VOCAB_SIZE, max_len=11)
    model, batch = synthetic_rollout(cfg, batch=64, seq_len=11, prompt_len=7)
    batch = grouped(batch)
    regime = Policy(scale=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(updates):
        training_update(model, batch, regime, opt)
    return cfg, model, batch, regime, opt
