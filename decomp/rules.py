"""Where ``λ`` comes from: coefficient rules, and the update context they read.

A :class:`CoefficientRule` computes the MTP coefficient ``λ`` of one update from the parts of an
:class:`UpdateContext` it declares it ``needs``. The context builds each part on first use and
keeps it, so several rules on one update share every pass, and a caller that has already built a
part hands it over (:meth:`UpdateContext.provide`). Parts, cheapest first:

- ``logprobs``: per MTP depth, the response-shaped MTP, main and rollout log-probs and mask of
  the update's mini-batch (no extra pass where the caller provides its forward);
- ``updates``: the step's updates ``u_RL``, ``δ₁`` through the live optimizer (one first-order
  pass, :func:`decomp.updates.step_updates`);
- ``jvp``: the exact first-order per-token changes ``a = ∇ℓ·δ₁``, ``b = ∇ℓ·u_RL`` (forward mode);
- ``decomposition``: the quadratic model on the training batch (two Hessian-vector products);
- ``gradients``: the RL and unit MTP gradients of the update's own forward (one more backward);
  a caller that finds them built composes the update's gradient from them instead of a backward;
- ``heldout``: the realized gain of the coming update on a held-out batch (forward passes).

Every rule in :data:`RULES` is one definition: the ``occ`` regime applies any rule with
``estimator=True`` (``occ_estimator``), the instrumentation measures and validates every such
rule at every instrumented update (``coef_<name>``, ``gain_<name>``, ...), ``--help-config``
lists it with its cost, the figures draw it in its ``style``, and the TRL trainer applies every
rule that needs only ``logprobs`` and can be summed across processes (``statistics``).
A rule returns ``nan`` where it is undefined; a regime then applies its ``fallback``.

``occ`` applies its estimator through :func:`controlled_rule`: as is, or under a control
(``occ_control``: its magnitudes with random signs, or its signs at ``|λ*|``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from decomp.curvature import jvp_logprobs, jvp_logprobs_batched
from decomp.decomposition import decompose_updates
from decomp.horizon import Horizon, HorizonGain, OptimizerSnapshot, training_rl_loss
from decomp.objectives import Objectives, RolloutBatch, check_eval_batch, model_logprobs, objectives
from decomp.occ import (
    REDUCTIONS,
    coefficient_from_statistics,
    projection_coefficient,
    proxy_coefficients,
    proxy_statistics,
    trust_region_coefficient,
)
from decomp.realized import RealizedGain
from decomp.search import DEFAULT_SEARCH_BOUND, SEARCH_DECADES, Optimum, ran_out_of_budget, realized_optimum
from decomp.updates import StepUpdates, step_updates

NEEDS = ("logprobs", "updates", "jvp", "decomposition", "gradients", "heldout")
NEED_WORDS = {"logprobs": "the mini-batch's log-probs", "updates": "the step's updates", "jvp": "their forward-mode changes",
              "decomposition": "the decomposition's Hessian-vector products", "gradients": "a second backward pass",
              "heldout": "a held-out batch"}


@dataclass(frozen=True)
class ProxyInputs:
    """One MTP depth's response-shaped, detached log-probs: ``m``, ``ℓ``, ``ℓ^old`` and the mask."""

    mtp_logp: Tensor
    logp: Tensor
    old_logp: Tensor
    mask: Tensor


@dataclass
class UpdateContext:
    """One coming update, as coefficient rules read it (module docstring).

    ``regime`` and ``coef`` define the MTP direction of the step's updates (``δ₁`` is taken at
    ``λ = coef``); ``loss`` holds the RL loss's parts (``clip``, ``kl_coef``, ``ref_logp``,
    ``rl_loss_of_logp``); ``heldout`` returns the held-out batch (sampled on first use);
    ``shared`` is a cache common to every context of one update (the log-probs, the held-out
    batch); ``seconds`` the time each part took to build. ``sign_seed`` seeds the random signs
    of ``occ_control=random_sign`` (:func:`controlled_rule`; ``None``: the caller has none, and
    that control refuses to run); ``metrics`` are per-update statistics a rule leaves for the
    step's metrics record (e.g. ``occ_estimate_abs``). ``future(n)`` returns ``n`` lookahead
    mini-batches for a rule that judges the update over a horizon (``oracle_horizon``).
    """

    model: nn.Module
    batch: RolloutBatch
    optimizer: torch.optim.Optimizer
    regime: Any  # decomp.regimes.Regime
    coef: float
    scale: float
    loss: dict[str, Any]
    heldout: Callable[[], RolloutBatch] | None = None
    batched_jvp: bool = False
    sign_seed: int | None = None
    future: Callable[[int], list[RolloutBatch]] | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    _parts: dict[str, Any] = field(default_factory=dict)

    def provide(self, part: str, value: Any) -> None:
        """Hand over a part the caller built (e.g. the decomposition it measured anyway)."""
        self._parts[part] = value

    def has(self, part: str) -> bool:
        return part in self._parts or part in self.shared

    def _once(self, part: str, build: Callable[[], Any], shared: bool = False) -> Any:
        cache = self.shared if shared else self._parts
        if part not in cache:
            start = time.perf_counter()
            cache[part] = build()
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start
        return cache[part]

    @property
    def params(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.model.named_parameters()}

    def logprobs(self) -> list[ProxyInputs]:
        """Per depth, from a no-grad forward unless the caller provided its own forward's."""
        return self._once("logprobs", self._logprobs, shared=True)

    def _logprobs(self) -> list[ProxyInputs]:
        batch = self.batch
        with torch.no_grad():
            logp, mtp_logps, valids = model_logprobs(self.model, self.params, batch.tokens,
                                                     attention_mask=batch.attention_mask)
        view, mask = batch.response, batch.mask.bool()
        return [ProxyInputs(view(m), view(logp), view(batch.old_logp), view(mask & v))
                for m, v in zip(mtp_logps, valids, strict=True)]

    def objectives(self) -> Objectives:
        """``J``, ``L_MTP`` and ``ℓ`` on the training batch, the MTP loss the regime's at ``coef``."""
        return self._once("objectives", lambda: _objectives(self.model, self.batch, self.regime, self.coef, self.loss))

    def step(self) -> StepUpdates:
        def build() -> StepUpdates:
            obj = self.objectives()
            shared = getattr(self.model, "shared_parameter_names", None)
            step = step_updates(obj.rl_objective, obj.mtp_loss, dict(self.model.named_parameters()),
                                coef=self.coef, optimizer=self.optimizer, rl_loss=obj.rl_loss,
                                first_order=obj.first_order, shared=None if shared is None else shared(),
                                rl_grad=self.shared.get("rl_grad"))
            # the RL update is every direction's: later contexts of this update reuse its gradient
            self.shared.setdefault("rl_grad", step.update_grad)
            return step

        return self._once("updates", build)

    def jvp(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(a, b, ℓ)`` response-shaped: ``a = ∇ℓ·δ₁``, ``b = ∇ℓ·u_RL`` and the log-probs of the
        same forward. ``batched_jvp``: both tangents in one pass (faster on a small model only)."""
        def build() -> tuple[Tensor, Tensor, Tensor]:
            updates, logprob_fn, params = self.step().updates, self.objectives().logprob_fn, self.params
            if self.batched_jvp:
                logp, (a, b) = jvp_logprobs_batched(logprob_fn, params, [updates.unit_displacement, updates.update_rl])
            else:
                a = jvp_logprobs(logprob_fn, params, updates.unit_displacement)
                logp, b = jvp_logprobs(logprob_fn, params, updates.update_rl, with_value=True)
            view = self.batch.response
            return view(a), view(b), view(logp)

        return self._once("jvp", build)

    def decomposition(self):
        """The decomposition of the coming update on the training batch (``λ*`` from it)."""
        return self._once("decomposition",
                          lambda: decompose_updates(self.step(), self.objectives().rl_objective).decomposition)

    def gradients(self) -> dict[str, tuple[Tensor | None, Tensor | None]]:
        """Per trainable parameter, ``(∇L_RL, ∇L_MTP)`` of the update's own forward (provided by
        the caller as part ``forward``: an object with ``rl_loss`` and ``unit_mtp_loss``)."""
        def build() -> dict[str, tuple[Tensor | None, Tensor | None]]:
            forward = self._parts.get("forward")
            if forward is None:
                raise ValueError("this rule needs the update's own forward (its gradients), and the caller gave none")
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            params = [p for _, p in named]
            g_rl = torch.autograd.grad(forward.rl_loss, params, retain_graph=True, allow_unused=True)
            g_mtp = torch.autograd.grad(forward.unit_mtp_loss, params, retain_graph=True, allow_unused=True)
            return {n: (a, b) for (n, _), a, b in zip(named, g_rl, g_mtp, strict=True)}

        return self._once("gradients", build)

    def heldout_batch(self) -> RolloutBatch:
        if self.heldout is None:
            raise ValueError("this rule needs a held-out batch, and the caller gave none")
        return self._once("heldout_batch", self.heldout, shared=True)

    def heldout_gain(self) -> RealizedGain:
        """The realized gain of the coming update (updates from the training batch) on the held-out batch."""
        def build() -> RealizedGain:
            eval_batch = self.heldout_batch()
            check_eval_batch(self.model, self.batch, eval_batch)
            return RealizedGain(objectives(self.model, eval_batch, self.regime).rl_objective, self.step())

        return self._once("heldout", build)


    def horizon_gain(self, k: int):
        """The ``k``-step realized gain of the coming update on the held-out batch
        (:class:`decomp.horizon.HorizonGain`), continued on ``future(k − 1)``'s mini-batches."""
        def build():
            if self.future is None:
                raise ValueError("a rule over a horizon needs lookahead mini-batches, and the caller gave none")
            if self.loss.get("rl_loss_of_logp") is not None or self.loss.get("kl_coef"):
                raise ValueError("a horizon continues with the built-in clipped surrogate, without a KL term")
            step = self.step()
            losses = tuple(training_rl_loss(self.model, b, self.loss["clip"]) for b in self.future(k - 1))
            snapshot = OptimizerSnapshot.of(self.optimizer, dict(self.model.named_parameters()))
            eval_batch = self.heldout_batch()
            check_eval_batch(self.model, self.batch, eval_batch)
            J = objectives(self.model, eval_batch, self.regime).rl_objective
            return HorizonGain(J, Horizon(step.theta, snapshot, step.update_grad, losses), step.grad_mtp,
                               model_tail=False)

        return self._once(f"horizon{k}", build)


@dataclass
class LogprobContext:
    """The whole context of a rule that needs only ``logprobs``: the inputs of each depth and
    ``c`` (what a regime called on bare tensors, or a trainer's loss, has at hand)."""

    inputs: list[ProxyInputs]
    scale: float

    def logprobs(self) -> list[ProxyInputs]:
        return self.inputs


def _objectives(model: nn.Module, batch: RolloutBatch, regime: Any, coef: float, loss: dict[str, Any]) -> Objectives:
    if loss.get("rl_loss_of_logp") is None:
        return objectives(model, batch, regime, coef=coef, clip=loss["clip"], kl_coef=loss["kl_coef"],
                          ref_logp=loss["ref_logp"])
    return objectives(model, batch, regime, coef=coef, rl_loss_of_logp=loss["rl_loss_of_logp"])


Value = float | tuple[float, ...]  # one λ, or one per MTP depth


@dataclass(frozen=True)
class CoefficientRule:
    """A way to set ``λ`` for one update (module docstring).

    ``compute(ctx)`` returns ``λ`` (``nan`` where undefined) or a tuple with one ``λ`` per MTP
    depth; ``needs`` the parts of ``ctx`` it reads; ``help`` and ``cost`` one line each for
    ``--help-config`` and the docs; ``estimator``: measured, validated and plotted at every
    instrumented update, and usable as ``occ_estimator``; ``style`` its ``(color, marker)`` in
    figures; ``statistics``: for rules on ``logprobs`` alone, the sums of one depth's inputs
    that add across processes, and ``from_statistics`` (summed sums, ``c``) → ``λ``.
    """

    name: str
    needs: frozenset[str]
    compute: Callable[[UpdateContext], Value]
    help: str
    cost: str
    estimator: bool = True
    style: tuple[str, str] | None = None
    statistics: Callable[[ProxyInputs], Tensor] | None = None
    from_statistics: Callable[[Tensor, float], float] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"rule {self.name!r}: unknown needs {sorted(unknown)}; valid: {', '.join(NEEDS)}")

    def per_depth(self, ctx: UpdateContext, depths: int) -> tuple[float, ...]:
        value = self.compute(ctx)
        return tuple(value) if isinstance(value, tuple) else (float(value),) * depths

    def value(self, ctx: UpdateContext) -> float:
        """``λ`` for the whole update: the mean over depths of a per-depth rule (as training
        applies the mean of the depths' coefficients)."""
        value = self.compute(ctx)
        return sum(value) / len(value) if isinstance(value, tuple) else float(value)

    def described_needs(self) -> str:
        """What the rule needs, in words, cheapest first."""
        return ", ".join(NEED_WORDS[n] for n in NEEDS if n in self.needs)

    @property
    def distributable(self) -> bool:
        """Whether a trainer on several processes can apply it (``logprobs`` and ``statistics``)."""
        return self.needs <= {"logprobs"} and self.statistics is not None and self.from_statistics is not None


RULES: dict[str, CoefficientRule] = {}


def register_rule(rule: CoefficientRule, replace: bool = False) -> CoefficientRule:
    """Add ``rule`` to :data:`RULES` (the one place a rule is declared); returns it. A rule of
    the same name is replaced only with ``replace``."""
    if not isinstance(rule, CoefficientRule):
        raise TypeError(f"expected a CoefficientRule, got {type(rule).__name__}")
    if rule.name in RULES and not replace:
        raise ValueError(f"a coefficient rule named {rule.name!r} exists already (replace=True replaces it)")
    RULES[rule.name] = rule
    return rule


def estimator_rules() -> dict[str, CoefficientRule]:
    """The rules measured at every instrumented update (and usable by ``occ``), in order."""
    return {name: rule for name, rule in RULES.items() if rule.estimator}


def get_rule(name: str) -> CoefficientRule:
    if name not in RULES:
        raise ValueError(f"unknown coefficient rule {name!r}; valid rules: {', '.join(RULES)}")
    return RULES[name]


# --- the proxies: log-prob differences, no extra pass -------------------------------------------

def _proxy(reduction: str) -> Callable[[UpdateContext], tuple[float, ...]]:
    def compute(ctx: UpdateContext) -> tuple[float, ...]:
        return tuple(proxy_coefficients(d.mtp_logp, d.logp, d.old_logp, d.mask, ctx.scale)[reduction]
                     for d in ctx.logprobs())

    return compute


def _proxy_statistics(d: ProxyInputs) -> Tensor:
    return proxy_statistics(d.mtp_logp - d.old_logp, d.logp - d.old_logp, d.mask)


PROXY_HELP = {
    "reference": "the paper's proxy as its public code computes it: c·mean over all B×T of a·b/(a²+1e-8), "
                 "a = m − ℓ^old, b = ℓ − ℓ^old",
    "masked": "the reference formula averaged over response tokens only",
    "pooled": "the least-squares slope c·Σ_M a·b / Σ_M a²",
}
PROXY_STYLE = {"reference": ("#E69F00", "o"), "masked": ("#56B4E9", "s"), "pooled": ("#009E73", "^")}
for _reduction in REDUCTIONS:
    register_rule(CoefficientRule(
        _reduction, frozenset({"logprobs"}), _proxy(_reduction), PROXY_HELP[_reduction], "none (the update's log-probs)",
        style=PROXY_STYLE[_reduction], statistics=_proxy_statistics,
        from_statistics=lambda stats, scale, r=_reduction: coefficient_from_statistics(stats, scale, r)))


# --- the jvp level and the trust region: forward-mode passes, no Hessian -----------------------

def _jvp(reduction: str) -> Callable[[UpdateContext], float]:
    def compute(ctx: UpdateContext) -> float:
        a, b, _ = ctx.jvp()
        return float(projection_coefficient(a, b, ctx.batch.response(ctx.batch.mask.bool()), ctx.scale, reduction))

    return compute


def _trust_region(ctx: UpdateContext) -> float:
    a, b, logp = ctx.jvp()
    view = ctx.batch.response
    ratio = torch.exp(logp - view(ctx.batch.old_logp))  # ℓ(θ) from the jvp's own forward
    return trust_region_coefficient(a, b, view(ctx.batch.advantages), ratio, view(ctx.batch.mask.bool()))


JVP_COST = "the step's updates (one first-order pass) and one forward-mode pass per tangent"
register_rule(CoefficientRule("jvp_masked", frozenset({"updates", "jvp"}), _jvp("masked"),
                              "the masked formula with exact first-order changes a = ∇ℓ·δ₁, b = ∇ℓ·u_RL", JVP_COST,
                              style=("#D55E00", "v")))
register_rule(CoefficientRule("jvp_pooled", frozenset({"updates", "jvp"}), _jvp("pooled"),
                              "the pooled formula with exact first-order changes", JVP_COST, style=("#CC79A7", "D")))
register_rule(CoefficientRule("trust_region", frozenset({"updates", "jvp"}), _trust_region,
                              "λ* of a first-order model with a Fisher (KL trust-region) penalty, in the units of λ",
                              JVP_COST, style=("#882255", "P")))
register_rule(CoefficientRule("exact", frozenset({"updates", "decomposition"}),
                              lambda ctx: ctx.decomposition().lambda_star,
                              "λ* of the quadratic model on the training batch",
                              "the step's updates and two Hessian-vector products", style=("#000000", "*")))


# --- rules that are not estimators: the cosine gate and the held-out oracle ---------------------

def cosine_gate(cosine: float, scale: float) -> float:
    """``c·max(0, cosine)``, 0 for an undefined cosine."""
    return scale * max(0.0, cosine) if math.isfinite(cosine) else 0.0


def _cosine(ctx: UpdateContext) -> float:
    """:func:`cosine_gate` of ``cos(∇L_RL, ∇L_MTP)`` on the shared parameters (the descent
    directions' cosine: ``cos(∇J, −∇L_MTP)``)."""
    shared = set(ctx.model.shared_parameter_names())
    pairs = [(a, b) for n, (a, b) in ctx.gradients().items() if n in shared and a is not None and b is not None]
    dot_ = sum(float((a.double() * b.double()).sum()) for a, b in pairs)
    norms = (sum(float(a.double().pow(2).sum()) for a, _ in pairs) * sum(float(b.double().pow(2).sum()) for _, b in pairs))
    return cosine_gate(dot_ / math.sqrt(norms) if norms > 0 else math.nan, ctx.scale)


def usable_optimum(coef: float, reason: str, bound: float) -> float:
    """A search's ``(λ̂, reason)`` as a coefficient: ``λ̂`` if it is an interior optimum, the best
    point of a search that ran out of its budget (only not resolved to ``rtol``), or the edge of a
    trust region (``|λ̂| = bound`` below the search's default bound); else ``nan``."""
    at_bound = bool(reason) and bound < DEFAULT_SEARCH_BOUND and math.isfinite(coef) and abs(coef) == bound
    return coef if math.isfinite(coef) and (not reason or at_bound or ran_out_of_budget(reason)) else math.nan


ORACLE_RULES = ("point", "interval", "shrink")


def noise_aware(coef: float, optimum: Optimum, rule: str) -> float:
    """What an oracle applies given the searched ``optimum`` (``coef``: its usable ``λ̂``, ``nan``
    where undefined) and its bootstrap over prompt groups: ``point`` ``λ̂``; ``interval`` ``λ̂`` where
    its 95% interval excludes 0, else 0 (no coefficient the data can tell from leaving the term
    out); ``shrink`` ``λ̂·|2P(λ̂ > 0) − 1|``: 0 when the sign is a coin flip, ``λ̂`` when no resample
    doubts it (``nan`` without a bootstrap)."""
    if rule == "point" or not math.isfinite(coef):
        return coef
    if rule == "interval":
        lo, hi = optimum.interval
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return math.nan
        return coef if lo > 0 or hi < 0 else 0.0
    if rule == "shrink":
        return coef * abs(2.0 * optimum.positive_prob - 1.0)
    raise ValueError(f"unknown oracle rule {rule!r}; valid: {', '.join(ORACLE_RULES)}")


def _oracle(ctx: UpdateContext) -> float:
    """The realized optimum ``λ̂`` on the held-out batch within ``|λ| ≤`` the regime's bound; with
    a bound below the search's default the constrained optimum (``±bound`` included); ``nan``
    where the search leaves ``λ̂`` undefined. With the regime's ``horizon`` ``k > 1`` the optimum
    of the ``k``-step gain (:meth:`UpdateContext.horizon_gain`); its ``noise_rule`` decides what
    is applied from the bootstrap over the held-out batch's prompt groups (:func:`noise_aware`).
    The search's grid is fixed by the bound: no state carried between updates, so a resumed run
    searches as an uninterrupted one."""
    regime = ctx.regime
    bound = getattr(regime, "bound", DEFAULT_SEARCH_BOUND)
    k, rule = getattr(regime, "horizon", 1), getattr(regime, "noise_rule", "point")
    rows = None if rule == "point" else ctx.heldout_batch().group_rows()
    gain = ctx.heldout_gain() if k == 1 else ctx.horizon_gain(k)
    optimum = realized_optimum(gain, row_sets=rows, bound=bound, decades=getattr(regime, "decades", SEARCH_DECADES))
    return noise_aware(usable_optimum(optimum.coef, optimum.reason, bound), optimum, rule)


register_rule(CoefficientRule("cosine", frozenset({"gradients"}), _cosine,
                              "c·max(0, cos(∇J, −∇L_MTP)) on the shared parameters (gradient similarity gate)",
                              "one more backward pass (the update's gradient is then composed from both)",
                              estimator=False))
register_rule(CoefficientRule("oracle", frozenset({"updates", "heldout"}), _oracle,
                              "the realized optimum λ̂ of the coming update on a held-out batch (not deployable; "
                              "oracle_horizon, oracle_rule)",
                              "a held-out rollout batch and 20–44 forward evaluations; with oracle_horizon k > 1, "
                              "k − 1 lookahead rollout batches and (k − 1) backward passes per evaluation",
                              estimator=False))


# --- controls of occ: its estimate's magnitude with random signs, or its sign at λ*'s magnitude ----

OCC_CONTROLS = ("none", "random_sign", "lambda_star_magnitude")
CONTROL_HELP = {
    "random_sign": "λ = s·|λ_occ|, s = ±1 drawn per update (and depth) from (seed, update): occ's magnitudes, "
                   "random directions",
    "lambda_star_magnitude": "λ = sign(λ_occ)·|λ*|, λ* the exact rule's on the training mini-batch: occ's "
                             "direction at λ*'s size (undefined where either is undefined or 0)",
}


def random_signs(seed: int, n: int) -> list[float]:
    """``n`` signs ``±1``, each ``+1`` with probability ½, from a CPU generator seeded by ``seed``
    (its own generator: no other random stream moves)."""
    gen = torch.Generator().manual_seed(seed)
    return [1.0 if bit else -1.0 for bit in torch.randint(0, 2, (n,), generator=gen).tolist()]


def _random_sign(values: tuple[float, ...], ctx: UpdateContext) -> tuple[float, ...]:
    """``s_k·|λ_k|``: the magnitudes kept bit for bit (``nan`` stays ``nan``), the signs random."""
    if ctx.sign_seed is None:
        raise ValueError("occ_control=random_sign needs the update's sign seed (UpdateContext.sign_seed), "
                         "and the caller gave none")
    return tuple(s * abs(v) for s, v in zip(random_signs(ctx.sign_seed, len(values)), values, strict=True))


def _lambda_star_magnitude(values: tuple[float, ...], ctx: UpdateContext) -> tuple[float, ...]:
    """``sign(λ_k)·|λ*|``; ``nan`` (the fallback) where ``λ_k`` or ``λ*`` is undefined or 0."""
    star = ctx.decomposition().lambda_star
    if not (math.isfinite(star) and star != 0.0):
        return (math.nan,) * len(values)
    return tuple(math.copysign(abs(star), v) if math.isfinite(v) and v != 0.0 else math.nan for v in values)


CONTROLS: dict[str, tuple[frozenset[str], Callable[[tuple[float, ...], UpdateContext], tuple[float, ...]]]] = {
    "random_sign": (frozenset(), _random_sign),
    "lambda_star_magnitude": (frozenset({"updates", "decomposition"}), _lambda_star_magnitude),
}


def controlled_rule(name: str, control: str = "none") -> CoefficientRule:
    """The rule ``name`` as ``occ`` applies it under ``control`` (:data:`OCC_CONTROLS`): its value
    ``λ_occ`` (``Value``: one ``λ`` or one per depth) mapped by the control, and ``ctx.metrics
    ["occ_estimate_abs"]`` set to the mean over depths of ``|λ_occ|`` (0 where undefined: what
    plain ``occ`` would apply). With ``"none"`` the values are the rule's own; the rule is read
    from :data:`RULES` at each call, so a replaced rule is the one controlled."""
    base = get_rule(name)
    if control != "none" and control not in CONTROLS:
        raise ValueError(f"unknown occ_control {control!r}; valid: {', '.join(OCC_CONTROLS)}")
    extra, transform = CONTROLS.get(control, (frozenset(), None))

    def compute(ctx: UpdateContext) -> Value:
        raw = base.compute(ctx)
        values = tuple(raw) if isinstance(raw, tuple) else (float(raw),)
        ctx.metrics["occ_estimate_abs"] = sum(abs(v) if math.isfinite(v) else 0.0 for v in values) / len(values)
        if transform is None:
            return raw
        out = transform(values, ctx)
        return out if isinstance(raw, tuple) else out[0]

    help_ = base.help if transform is None else f"{base.help}, under {control}: {CONTROL_HELP[control]}"
    return dataclasses.replace(base, name=name if transform is None else f"{name}+{control}",
                               needs=base.needs | extra, compute=compute, help=help_, estimator=False,
                               statistics=None, from_statistics=None)


def rules_help() -> list[str]:
    """One line per rule for ``--help-config``: name, what it needs, its cost and meaning."""
    return [f"  {r.name:<14} needs {', '.join(n for n in NEEDS if n in r.needs):<24} cost: {r.cost}; {r.help}"
            + ("" if r.estimator else " (not an occ_estimator)") for r in RULES.values()]
