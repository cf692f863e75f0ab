"""Beyond one step: the ``k``-step realized gain of an update's MTP term (docs/method.md §3.6).

Under Adam one update's MTP gradient enters that update's displacement with weight
``(1−β₁)/(1−β₁ᵗ)``; the rest arrives through the first moment over the next updates, and
``λ²g_M²`` stays in the second moment for about ``1/(1−β₂)`` updates. The one-step ``λ̂`` and
``λ*`` (§3.3, §3.5) leave that out. Here, for a coefficient ``λ``:

```
θ_1(λ) = θ + u(λ)                          the update with λ·∇L_MTP added (the real optimizer's step)
θ_{j+1}(λ) = θ_j(λ) + u_RL,j(θ_j(λ))       j = 1 … k−1: RL-only updates on the same future
                                           mini-batches for every λ, optimizer state carried
ΔJ_k(λ) = J(θ_k(λ)) − J(θ_k(0))            on the evaluation batch (held-out rollouts at θ)
λ̂_k = argmax_λ ΔJ_k(λ)                     (k = 1: the one-step λ̂)
```

The steps are the live optimizer's own (a fresh ``torch.optim`` instance of its class over
copies of the parameters, loaded with a copy of its state: :class:`OptimizerSnapshot`), so the
continuation at the coefficient training applied reproduces the training loop's next updates
bit for bit where those are RL-only on the parameters ``J`` reads (tested). ``λ̂_k``'s search and
bootstrap are :mod:`decomp.search`'s, on :class:`HorizonGain`.

**The horizon-aware quadratic model.** Assume the later updates' gradients do not depend on ``λ``
(no feedback: the MTP displacement changes them by ``O(η‖H‖·λ‖δ₁‖)`` per update). Then only the
optimizer's state carries ``λ``: with ``G`` the gradient update ``t`` stepped on and ``g_M =
∇L_MTP``, Adam's moments after update ``t + j`` move by ``dm_j/dλ = β₁ʲ(1−β₁)g_M`` and
``dv_j/dλ = 2β₂ʲ(1−β₂)G·g_M``, and the displacement per unit coefficient over ``k`` updates is

```
δ₁,k = Σ_{j<k} (1 − η_j w)^{k−1−j} du_j/dλ,
du_j/dλ = −η_j/(1−β₁^{s_j}) · [ dm_j/dλ / D_j − m_j · dv_j/dλ / (2(1−β₂^{s_j}) √v̂_j D_j²) ]
```

(``m_j``, ``v_j``, ``s_j``, ``D_j = √v̂_j + ε`` of the ``λ = 0`` continuation, ``w`` AdamW's
decoupled weight decay; ``j = 0`` is §3.3's ``δ₁``). For SGD with momentum ``μ`` the buffer
carries ``μʲκg_M``. Expanding ``J`` around the end of the ``λ = 0`` continuation,
``ΔJ_k(λ) ≈ λC₁,k − λ²P₁,k`` with ``C₁,k = ⟨∇J(θ_k(0)), δ₁,k⟩`` and ``P₁,k = −½δ₁,kᵀ∇²J(θ_k(0))δ₁,k``
(no cross term: the gradient at the end point already carries the RL updates), so

```
λ*_k = C₁,k / (2 P₁,k)        (P₁,k > 0)
```

Each group's ``C₁,k`` and ``P₁,k`` come from one nested forward-mode pass over the evaluation
batch (:func:`directional_terms`), their standard errors and ``λ*_k``'s jackknife from
:mod:`decomp.uncertainty`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from decomp.checks import Params
from decomp.curvature import any_attention, math_attention
from decomp.objectives import RolloutBatch, aligned_main_logprobs, clipped_rl_loss
from decomp.search import GridOptions, Optimum, realized_optimum
from decomp.uncertainty import jackknife_lambda_star, ratio_se

SUPPORTED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
ENDPOINT_CACHE_BYTES = 256 * 2**20  # end points kept for reuse (the built-in model's take 0.6 MB each)


@dataclass(frozen=True)
class OptimizerSnapshot:
    """A ``torch.optim`` optimizer at one update: its class, which parameter (by name) each of its
    slots holds, and a deep copy of its ``state_dict`` (the live one is never touched again)."""

    cls: type
    names: tuple[tuple[str, ...], ...]  # per parameter group, the names of its parameters in order
    state_dict: dict[str, Any]

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, named_params: dict[str, Tensor]) -> OptimizerSnapshot:
        if not isinstance(optimizer, SUPPORTED):
            raise ValueError(f"the k-step gain steps a copy of the optimizer: SGD, Adam or AdamW, got "
                             f"{type(optimizer).__name__}")
        ids = {id(t): k for k, t in named_params.items()}
        names = tuple(tuple(ids[id(p)] for p in g["params"]) for g in optimizer.param_groups)
        return cls(type(optimizer), names, copy.deepcopy(optimizer.state_dict()))

    def build(self, params: Params) -> torch.optim.Optimizer:
        """A fresh optimizer over ``params`` (leaf tensors, by name) with a copy of the state."""
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[n] for n in names]}
                  for g, names in zip(self.state_dict["param_groups"], self.names, strict=True)]
        opt = self.cls(groups)
        opt.load_state_dict(copy.deepcopy(self.state_dict))
        return opt

    @property
    def held(self) -> set[str]:
        return {n for names in self.names for n in names}


def training_rl_loss(model: nn.Module, batch: RolloutBatch, clip: tuple[float, float], kl_coef: float = 0.0,
                     ref_logp: Tensor | None = None) -> Callable[[Params], Tensor]:
    """The reference loop's RL loss of one mini-batch (clipped surrogate + KL) as a function of
    the parameters, computed as the loop's forward computes it (every position's logits), so that
    its gradient is the loop's to the bit."""
    loss_of_logp = clipped_rl_loss(batch, clip, kl_coef, ref_logp)
    kwargs: dict[str, Any] = {"with_mtp": False}
    if batch.attention_mask is not None:
        kwargs["attention_mask"] = batch.attention_mask

    def loss(params: Params) -> Tensor:
        main, _ = functional_call(model, params, (batch.tokens,), kwargs)
        return loss_of_logp(aligned_main_logprobs(main, batch.tokens))

    return loss


def gradient(loss: Callable[[Params], Tensor], theta: Params) -> Params:
    """``∇loss(θ)`` with the fused attention kernel, as a training update takes it."""
    with any_attention():
        return torch.func.grad(loss)(theta)


@dataclass(frozen=True)
class Horizon:
    """Where the ``k``-step continuation starts and what it steps on.

    ``theta``: the parameters before update ``t`` (detached, never modified); ``optimizer`` its
    state then; ``rl_grad``: ``∇L_RL`` of update ``t``'s mini-batch at ``theta``; ``future``: the RL
    losses of updates ``t+1 … t+k−1`` (the same for every ``λ``)."""

    theta: Params
    optimizer: OptimizerSnapshot
    rl_grad: Params
    future: tuple[Callable[[Params], Tensor], ...] = ()
    cache_bytes: int = ENDPOINT_CACHE_BYTES
    # end points already computed, by (the MTP gradient's identity, λ): the splits of one update
    # (heldout, heldout2) search the same grid along the same direction
    _cache: dict[tuple[int, float], tuple[Params, Params]] = field(default_factory=dict, init=False, compare=False,
                                                                   repr=False)
    _uncached: list[int] = field(default_factory=lambda: [0], init=False, compare=False, repr=False)  # end points not kept

    @property
    def k(self) -> int:
        return 1 + len(self.future)

    @property
    def continuations(self) -> int:
        """End points computed so far (a cached one is not computed again)."""
        return len(self._cache) + self._uncached[0]

    def endpoint(self, grad_mtp: Params, coef: float, unit: dict[str, Any] | None = None) -> Params:
        """``θ_k(λ)`` for ``λ = coef`` (read-only: an end point asked for again along the same
        ``grad_mtp`` object is the one computed before, while their bytes stay within
        ``cache_bytes``); with ``unit`` (a dict, filled at ``λ = 0`` only), ``δ₁,k``
        (``unit["total"]``) and its first update's term ``δ₁`` (``unit["first"]``) of the module
        docstring, per parameter the optimizer holds."""
        key = (id(grad_mtp), float(coef))
        if unit is None and key in self._cache:
            return self._cache[key][1]
        params = self._continue(grad_mtp, coef, unit)
        size = sum(t.numel() * t.element_size() for t in params.values())
        if unit is None and size * (len(self._cache) + 1) <= self.cache_bytes:
            self._cache[key] = (grad_mtp, params)  # the gradient kept alive: its id stays its own
        else:
            self._uncached[0] += 1
        return params

    def _continue(self, grad_mtp: Params, coef: float, unit: dict[str, Any] | None) -> Params:
        held = self.optimizer.held
        params = {n: t.detach().clone() for n, t in self.theta.items()}
        opt = self.optimizer.build(params)
        tail = _UnitTail(opt, params, self.rl_grad, grad_mtp) if unit is not None else None
        with torch.no_grad():
            for n in held:
                params[n].grad = self.rl_grad[n] + coef * grad_mtp[n] if coef else self.rl_grad[n].clone()
        opt.step()
        if tail is not None:
            tail.after_step(0)
        for j, loss in enumerate(self.future, start=1):
            grads = gradient(loss, params)
            for n in held:
                params[n].grad = grads[n]
            opt.step()
            if tail is not None:
                tail.after_step(j)
        if unit is not None:
            unit.update(total=tail.total_, first=tail.first)
        for p in params.values():
            p.grad = None
        return params


class _UnitTail:
    """``δ₁,k`` of the module docstring, accumulated along the ``λ = 0`` continuation from the
    optimizer's state after each update (no feedback of ``λ`` into later gradients)."""

    def __init__(self, opt: torch.optim.Optimizer, params: Params, rl_grad: Params, grad_mtp: Params) -> None:
        if not isinstance(opt, SUPPORTED):
            raise ValueError(f"δ₁,k needs SGD, Adam or AdamW, got {type(opt).__name__}")
        self.opt, self.params, self.grad_mtp = opt, params, grad_mtp
        self.ids = {id(t): n for n, t in params.items()}
        self.total_: dict[str, Tensor] = {}
        self.first: dict[str, Tensor] = {}  # the j = 0 term: the one-step δ₁ of §3.3
        self.first_grad: dict[str, Tensor] = {}  # G: the gradient the optimizer saw at update t
        self.kappa: dict[str, float] = {}  # SGD: the share of update t's gradient in its momentum buffer
        for group in opt.param_groups:
            if group.get("amsgrad", False) or group.get("maximize", False):
                raise ValueError("δ₁,k is derived for SGD/Adam/AdamW without amsgrad or maximize")
            for p in group["params"]:
                name = self._name(p)
                g = rl_grad[name].double()
                if not isinstance(opt, torch.optim.AdamW) and group["weight_decay"]:
                    g = g + group["weight_decay"] * p.detach().double()  # coupled decay enters the gradient
                self.first_grad[name] = g
                if isinstance(opt, torch.optim.SGD):
                    buf = opt.state.get(p, {}).get("momentum_buffer")
                    self.kappa[name] = 1.0 if buf is None else 1.0 - group["dampening"]

    def _name(self, p: Tensor) -> str:
        return self.ids[id(p)]

    def after_step(self, j: int) -> None:
        for group in self.opt.param_groups:
            for p in group["params"]:
                name = self._name(p)
                du = self._sgd(group, name, j) if isinstance(self.opt, torch.optim.SGD) else self._adam(group, p, name, j)
                decay = 1.0 - group["lr"] * group["weight_decay"] if isinstance(self.opt, torch.optim.AdamW) else 1.0
                if j == 0:
                    self.first[name] = du
                prev = self.total_.get(name)
                self.total_[name] = du if prev is None else prev * decay + du

    def _sgd(self, group: dict[str, Any], name: str, j: int) -> Tensor:
        g_m, mu = self.grad_mtp[name].double(), group["momentum"]
        if not mu:
            return -group["lr"] * g_m if j == 0 else torch.zeros_like(g_m)
        buf = mu ** j * self.kappa[name] * g_m
        if group["nesterov"]:
            return -group["lr"] * ((g_m if j == 0 else 0.0) + mu * buf)
        return -group["lr"] * buf

    def _adam(self, group: dict[str, Any], p: Tensor, name: str, j: int) -> Tensor:
        st = self.opt.state[p]
        b1, b2 = group["betas"]
        s = float(st["step"])
        m, v = st["exp_avg"].double(), st["exp_avg_sq"].double()
        g_m = self.grad_mtp[name].double()
        bc1, bc2 = 1 - b1 ** s, 1 - b2 ** s
        root = (v / bc2).sqrt()
        denom = root + group["eps"]
        dm = b1 ** j * (1 - b1) * g_m
        dv = 2 * b2 ** j * (1 - b2) * self.first_grad[name] * g_m
        # where v = 0, m = 0 too: the second moment's path vanishes
        second = torch.where(root > 0, m * dv / (2 * bc2 * root.clamp_min(1e-300) * denom * denom), torch.zeros_like(m))
        return -group["lr"] / bc1 * (dm / denom - second)


class HorizonGain:
    """``ΔJ_k(λ) = J(θ_k(λ)) − J(θ_k(0))`` on ``objective`` (an
    :class:`~decomp.objectives.ImportanceObjective`: the difference is formed token by token in
    float64) for the MTP gradient ``grad_mtp``; the same interface as
    :class:`decomp.realized.RealizedGain` for :func:`decomp.search.realized_optimum`. ``dtype``
    evaluates ``J`` at the end points cast to it. Building it runs the ``λ = 0`` continuation,
    which also gives ``δ₁,k`` (:attr:`unit_displacement`) and ``θ_k(0)`` (:attr:`base_point`)."""

    def __init__(self, objective: Any, horizon: Horizon, grad_mtp: Params, dtype: torch.dtype | None = None,
                 model_tail: bool = True) -> None:
        self.objective, self.horizon, self.grad_mtp, self.dtype = objective, horizon, grad_mtp, dtype
        self.unit_displacement: dict[str, Tensor] = {}  # δ₁,k
        self.one_step_unit: dict[str, Tensor] = {}  # its first update's share: §3.3's δ₁
        self.tail_error = ""
        try:
            tail: dict[str, Any] = {}
            self.base_point = horizon.endpoint(grad_mtp, 0.0, tail if model_tail else None)
            self.unit_displacement, self.one_step_unit = tail.get("total", {}), tail.get("first", {})
        except ValueError as err:  # an optimizer the model is not derived for: the gain still works
            self.tail_error = str(err)
            self.base_point = horizon.endpoint(grad_mtp, 0.0)
        self.evaluations = 0
        self._base = self._logprobs(self.base_point)

    def _logprobs(self, point: Params) -> Tensor:
        with torch.no_grad(), any_attention():
            self.evaluations += 1
            cast = point if self.dtype is None else {k: v.to(self.dtype) if v.is_floating_point() else v
                                                     for k, v in point.items()}
            return self.objective.logprobs(cast)

    def at_coefs(self, coefs: Sequence[float], row_sets: Sequence[Tensor] | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        totals = np.zeros(len(coefs), dtype=np.float64)
        parts = None if row_sets is None else np.zeros((len(coefs), len(row_sets)), dtype=np.float64)
        for i, coef in enumerate(coefs):
            if float(coef) == 0.0:
                continue
            logp = self._logprobs(self.horizon.endpoint(self.grad_mtp, float(coef)))
            totals[i] = self.objective.difference(logp, self._base)
            if parts is not None:
                parts[i] = self.objective.difference_parts(logp, self._base, list(row_sets))
        return totals, parts

    def __call__(self, coef: float) -> float:
        return float(self.at_coefs([coef])[0][0])


def directional_terms(objective: Any, theta: Params, direction: Params, row_sets: list[Tensor]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Each group's ``(∇J_g·v, vᵀ∇²J_g v)`` at ``theta`` along ``v = direction``: one nested
    forward-mode pass over every row (:meth:`~decomp.objectives.ImportanceObjective.row_values`),
    or, for a model without forward-over-forward derivatives, one reverse-mode pass per group."""
    theta = {k: v.detach() for k, v in theta.items()}
    v = {k: direction[k].to(theta[k].dtype) if k in direction else torch.zeros_like(theta[k]) for k in theta}
    try:
        with math_attention(), torch.no_grad():
            first, second = jvp(lambda p: jvp(objective.row_values, (p,), (v,))[1], (theta,), (v,))
        first, second = first.double(), second.double()
        return (np.array([float(first[idx].sum()) for idx in row_sets]),
                np.array([float(second[idx].sum()) for idx in row_sets]))
    except NotImplementedError:  # e.g. Llama's SiLU backward has no forward-mode derivative
        return _reverse_terms(objective, theta, v, row_sets)


def _reverse_terms(objective: Any, theta: Params, v: Params, row_sets: list[Tensor]) -> tuple[np.ndarray, np.ndarray]:
    firsts, seconds = [], []
    for part in objective.split_rows(list(row_sets)):
        if part is None:
            firsts.append(0.0)
            seconds.append(0.0)
            continue
        with math_attention():
            def directional(p: Params) -> Tensor:
                g = torch.func.grad(part)(p)
                return sum((g[k] * v[k]).sum() for k in p)
            value, hv_dot = torch.func.grad_and_value(directional)(theta)
        firsts.append(float(value))
        seconds.append(sum(float((hv_dot[k].double() * v[k].double()).sum()) for k in theta))
    return np.array(firsts), np.array(seconds)


@dataclass(frozen=True)
class HorizonModel:
    """The horizon-aware quadratic model's terms on the evaluation batch (module docstring)."""

    correlation_unit_k: float
    penalty_unit_k: float
    lambda_star_k: float
    correlation_unit_k_se: float
    penalty_unit_k_se: float
    lambda_star_k_se: float
    unit_displacement_k_norm: float
    unit_displacement_first_norm: float
    reason: str = ""


def horizon_model(objective: Any, gain: HorizonGain, row_sets: list[Tensor], tokens: Sequence[float],
                  shared: Collection[str] | None = None) -> HorizonModel:
    """``C₁,k``, ``P₁,k``, ``λ*_k`` and their group errors at ``θ_k(0)`` along ``δ₁,k``; the norms of
    ``δ₁,k`` and of its first update's ``δ₁`` over the parameters ``shared`` (those ``J`` reads;
    ``None``: all): where the RL gradient is 0, as on the MTP module's own parameters, Adam's
    linearisation is ``g_M/ε`` and would swamp a norm over everything."""
    if gain.tail_error:
        return HorizonModel(*([math.nan] * 8), reason=gain.tail_error)
    unit = gain.unit_displacement

    def norm(d: dict[str, Tensor]) -> float:
        return math.sqrt(sum(float(t.pow(2).sum()) for n, t in d.items() if shared is None or n in shared))
    c, second = directional_terms(objective, gain.base_point, unit, row_sets)
    p = -0.5 * second
    c1, p1 = float(c.sum()), float(p.sum())
    reason = "" if p1 > 0 else ("the unit displacement does not move J" if c1 == 0 and p1 == 0
                                else "J is not concave along δ₁,k: no interior maximum")
    lam = c1 / (2 * p1) if p1 > 0 else math.nan
    jack = jackknife_lambda_star(np.stack([c, np.zeros_like(c), p], axis=1))
    return HorizonModel(c1, p1, lam, ratio_se(c, tokens), ratio_se(p, tokens), jack, norm(unit),
                        norm(gain.one_step_unit), reason)


def k_step_optimum(gain: HorizonGain, row_sets: list[Tensor] | None, extra: Sequence[float] = (),
                   **options: Any) -> Optimum:
    """``λ̂_k`` with its bootstrap interval (:func:`decomp.search.realized_optimum` on ``gain``)."""
    opts: GridOptions = {**options, "extra": list(extra)}  # type: ignore[typeddict-item]
    return realized_optimum(gain, row_sets=row_sets, **opts)


def measure_horizon(objective: Any, horizon: Horizon, grad_mtp: Params, *, coef: float, row_sets: list[Tensor],
                    tokens: Sequence[float], lambda_hat: float = math.nan, dtype: torch.dtype | None = None,
                    shared: Collection[str] | None = None, others: dict[str, float] | None = None,
                    search: GridOptions | None = None) -> dict[str, Any]:
    """One record of the ``k``-step measurement for one direction on one evaluation batch:
    ``lambda_hat_k`` with its interval, the model's ``lambda_star_k``, and the ``k``-step gains of
    the applied ``coef``, of ``λ*_k`` and of the one-step ``lambda_hat`` (module docstring). ``others``: more
    coefficients by name (e.g. another batch's ``λ*_k``), each recorded with its ``gain_k_<name>``.
    """
    start = time.perf_counter()
    gain = HorizonGain(objective, horizon, grad_mtp, dtype)
    model = horizon_model(objective, gain, row_sets, tokens, shared)
    others = others or {}
    extras = [coef, model.lambda_star_k, lambda_hat, *others.values()]
    finite = [c for c in extras if math.isfinite(c)]
    opt = k_step_optimum(gain, row_sets if len(row_sets) >= 2 else None, extra=finite, **(search or {}))
    extra_gain = dict(zip(finite, opt.extra_gains, strict=True))

    def gain_at(c: float) -> float:
        return extra_gain[c] if math.isfinite(c) else math.nan
    return {
        "horizon": horizon.k, "lambda_hat_k": opt.coef, "gain_hat_k": opt.gain, "lambda_hat_k_reason": opt.reason,
        "lambda_hat_k_interval": list(opt.interval), "lambda_hat_k_positive_prob": opt.positive_prob,
        "lambda_hat_k_near_optimal": list(opt.near_optimal), "evaluations_k": opt.evaluations,
        "coefs_k": list(opt.coefs), "gains_k": list(opt.gains),
        "gain_k_coef": gain_at(coef), "gain_k_lambda_star_k": gain_at(model.lambda_star_k),
        "gain_k_lambda_hat": gain_at(lambda_hat),
        "correlation_unit_k": model.correlation_unit_k, "penalty_unit_k": model.penalty_unit_k,
        "lambda_star_k": model.lambda_star_k, "lambda_star_k_reason": model.reason,
        "correlation_unit_k_se": model.correlation_unit_k_se, "penalty_unit_k_se": model.penalty_unit_k_se,
        "lambda_star_k_se": model.lambda_star_k_se, "unit_displacement_k_norm": model.unit_displacement_k_norm,
        "unit_displacement_first_norm": model.unit_displacement_first_norm,
        **{f: v for name, c in others.items() for f, v in ((name, c), (f"gain_k_{name}", gain_at(c)))},
        "seconds": time.perf_counter() - start,
    }
