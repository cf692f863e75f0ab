"""Pure counterfactual optimizer steps (SGD with momentum, Adam/AdamW).

A counterfactual optimizer computes the update ``u = θ_new − θ`` that ``torch.optim`` *would*
apply for given gradients and the current state, without touching the parameters or the state.
They reproduce ``torch.optim.SGD`` / ``torch.optim.AdamW`` to float32 rounding (tested).

The decomposition (docs/method.md §3) needs, for one step:

- ``u_RL``: the update for the RL loss gradient ``−∇J`` alone (the ``detach`` update on every
  coordinate ``J`` depends on);
- ``δ = u − u_RL``: the MTP displacement, where ``u`` is the update for ``−∇J + λ∇L_MTP``;
- ``δ₁ = dδ/dλ`` at ``λ = 0``, exactly: the derivative of the optimizer's whole step rule in
  the coefficient of the added gradient.

  - SGD (affine in the gradient): ``δ₁ = −η κ ∇L_MTP``, ``κ`` the momentum factor of this step
    (1 for plain SGD), and ``δ = λ δ₁`` exactly;
  - Adam/AdamW, per coordinate, with ``G = g_RL`` (plus the coupled decay ``w·θ`` for Adam),
    ``m = β₁m' + (1−β₁)G``, ``v = β₂v' + (1−β₂)G²`` (AMSGrad: ``max(v'_max, v)``) and
    ``D = √(v/(1−β₂ᵗ)) + ε``::

        δ₁ = −η/(1−β₁ᵗ) · [ (1−β₁)·g_MTP / D  −  m · (dv/dλ) / (2 (1−β₂ᵗ) √(v/(1−β₂ᵗ)) D²) ]

    with ``dv/dλ = 2(1−β₂)·G·g_MTP`` (0 where AMSGrad's stored maximum is the larger, and
    where ``v = 0``, where ``m = 0`` too). The first term is the first moment's path, the
    second the second moment's: holding ``√v̂`` fixed (the first term alone) overstates ``δ₁``
    early in training, when this step's gradient is a large part of ``v``. At Adam's first step
    the two nearly cancel (the update is ``≈ −η·sign(G)``, flat in ``λ``).

Parameters absent from the optimizer (frozen) get a zero update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor

from decomp.checks import Params, check_number
from decomp.curvature import bounded_runs

State = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Counterfactual:
    """The three update dicts of one instrumented step (see module docstring)."""

    update_rl: Params
    displacement: Params
    unit_displacement: Params


@dataclass(frozen=True)
class SGDHyper:
    """Hyperparameters of ``torch.optim.SGD`` for one parameter."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False


@dataclass(frozen=True)
class AdamHyper:
    """Hyperparameters of ``torch.optim.Adam``/``AdamW`` for one parameter (AdamW defaults)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    decoupled_weight_decay: bool = True
    amsgrad: bool = False


class CounterfactualOptimizer(Protocol):
    """What :func:`decomp.decomposition.decompose` needs from an optimizer."""

    name: str
    linear: bool  # True when the step is affine in the gradient (then δ = λ δ₁ exactly)

    def update(self, params: Params, grads: Params) -> Params: ...

    def counterfactual(
        self, params: Params, rl_grads: Params, mtp_grads: Params, coef: float
    ) -> Counterfactual: ...

    def displacement(
        self, params: Params, rl_grads: Params, mtp_grads: Params, coef: float, update_rl: Params
    ) -> Params: ...

    def displacements(
        self, params: Params, rl_grads: Params, mtp_grads: Params, coefs: list[float], update_rl: Params
    ) -> Params: ...

    def with_lr(self, lr: float) -> CounterfactualOptimizer: ...


def _per_param(hyper: Any, cls: type, names: list[str] | None = None) -> Any:
    if isinstance(hyper, cls):
        return hyper
    if isinstance(hyper, Mapping):
        for key, h in hyper.items():
            if h is not None and not isinstance(h, cls):
                raise TypeError(f"hyper[{key!r}] must be {cls.__name__} or None")
        return dict(hyper)
    raise TypeError(f"hyper must be a {cls.__name__} or a dict name -> {cls.__name__}")


def _validate_hyper(h: SGDHyper | AdamHyper) -> None:
    check_number(h.lr, "lr", nonnegative=True)
    check_number(h.weight_decay, "weight_decay", nonnegative=True)
    if isinstance(h, SGDHyper):
        check_number(h.momentum, "momentum", nonnegative=True)
        check_number(h.dampening, "dampening")
        if h.nesterov and (h.momentum <= 0 or h.dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
    else:
        for i, b in enumerate(h.betas):
            b = check_number(b, f"betas[{i}]")
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
        check_number(h.eps, "eps", nonnegative=True)


class _Base:
    name = "base"
    linear = False
    _hyper_cls: type = object

    def __init__(self, hyper: Any, state: State | None = None) -> None:
        self._hyper = _per_param(hyper, self._hyper_cls)
        for h in self._hyper.values() if isinstance(self._hyper, dict) else [self._hyper]:
            if h is not None:
                _validate_hyper(h)
        self._state: dict[str, Mapping[str, Any]] = dict(state or {})

    def hyper(self, key: str) -> Any:
        """Hyperparameters of parameter ``key`` (``None``: not optimised, zero update)."""
        if isinstance(self._hyper, dict):
            return self._hyper.get(key)
        return self._hyper

    def state(self, key: str) -> Mapping[str, Any]:
        return self._state.get(key, {})

    def with_lr(self, lr: float) -> Any:
        """A copy with every parameter's learning rate set to ``lr``."""
        lr = check_number(lr, "lr", nonnegative=True)
        if isinstance(self._hyper, dict):
            hyper = {k: (None if h is None else replace(h, lr=lr)) for k, h in self._hyper.items()}
        else:
            hyper = replace(self._hyper, lr=lr)
        return type(self)(hyper, self._state)


class SGD(_Base):
    """Counterfactual ``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay).

    ``state[name]["momentum_buffer"]`` is the torch momentum buffer (``None`` before the first
    step). Build it from a live optimizer with :func:`from_torch`.
    """

    name = "sgd"
    linear = True
    _hyper_cls = SGDHyper

    def _direction(self, key: str, p: Tensor, g: Tensor) -> tuple[Tensor, float]:
        """The vector torch multiplies by ``−lr``, and the momentum factor κ of a gradient."""
        h: SGDHyper = self.hyper(key)
        d = g
        if h.weight_decay != 0:
            d = d.add(p, alpha=h.weight_decay)
        kappa = 1.0
        if h.momentum != 0:
            buf = self.state(key).get("momentum_buffer")
            if buf is None:
                new_buf = d
            else:
                new_buf = buf.mul(h.momentum).add(d, alpha=1 - h.dampening)
                kappa = 1 - h.dampening
            if h.nesterov:
                d = d.add(new_buf, alpha=h.momentum)
                kappa = 1 + h.momentum * kappa
            else:
                d = new_buf
        return d, kappa

    def update(self, params: Params, grads: Params) -> Params:
        """``u = θ_new − θ`` of one ``torch.optim.SGD`` step with ``grads`` (of a loss)."""
        out = {}
        for key, p in params.items():
            h = self.hyper(key)
            if h is None:
                out[key] = torch.zeros_like(p)
                continue
            d, _ = self._direction(key, p.detach(), grads[key])
            out[key] = d.mul(-h.lr)
        return out

    def counterfactual(
        self, params: Params, rl_grads: Params, mtp_grads: Params, coef: float
    ) -> Counterfactual:
        update_rl, unit, disp = {}, {}, {}
        for key, p in params.items():
            h = self.hyper(key)
            if h is None:
                update_rl[key] = unit[key] = disp[key] = torch.zeros_like(p)
                continue
            d, kappa = self._direction(key, p.detach(), rl_grads[key])
            update_rl[key] = d.mul(-h.lr)
            unit[key] = mtp_grads[key].mul(-h.lr * kappa)
            disp[key] = unit[key].mul(coef)
        return Counterfactual(update_rl, disp, unit)

    def displacements(self, params: Params, rl_grads: Params, mtp_grads: Params, coefs: list[float],
                      update_rl: Params) -> Params:
        """:meth:`displacement` at every coefficient of ``coefs``, ``[K, *shape]`` per parameter."""
        per_coef = [self.displacement(params, rl_grads, mtp_grads, c, update_rl) for c in coefs]
        return {k: torch.stack([d[k] for d in per_coef]) for k in params}

    def displacement(self, params: Params, rl_grads: Params, mtp_grads: Params, coef: float,
                     update_rl: Params) -> Params:
        """``δ(λ) = λ δ₁`` (SGD is affine in the gradient)."""
        out = {}
        for key, p in params.items():
            h = self.hyper(key)
            if h is None:
                out[key] = torch.zeros_like(p)
                continue
            _, kappa = self._direction(key, p.detach(), rl_grads[key])
            out[key] = mtp_grads[key].mul(-h.lr * kappa * coef)
        return out


class AdamW(_Base):
    """Counterfactual ``torch.optim.AdamW`` (and ``Adam`` with ``decoupled_weight_decay=False``).

    ``state[name]`` holds torch's ``step``, ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``
    with AMSGrad); a missing entry is a fresh state (step 0, zero moments).
    """

    linear = False
    _hyper_cls = AdamHyper

    @property
    def name(self) -> str:
        """``"adamw"`` (decoupled weight decay) or ``"adam"`` (L2 weight decay in the gradient)."""
        hs = self._hyper.values() if isinstance(self._hyper, dict) else [self._hyper]
        coupled = any(h is not None and not h.decoupled_weight_decay and h.weight_decay for h in hs)
        return "adam" if coupled else "adamw"

    def _moments(self, key: str, p: Tensor, g: Tensor) -> tuple[Tensor, Tensor, float, float]:
        """New first moment, denominator ``√v̂ + ε``, step size ``η/(1−β₁ᵗ)`` and β₁ weight."""
        m_new, root, step_size, w1, _ = self._moments_raw(key, p, g)
        return m_new, root.add_(self.hyper(key).eps), step_size, w1

    def _moments_raw(self, key: str, p: Tensor, g: Tensor) -> tuple[Tensor, Tensor, float, float, Tensor | None]:
        """New first moment ``m``, ``√v̂`` (as torch computes it: ``√v/√(1−β₂ᵗ)``), step size
        ``η/(1−β₁ᵗ)``, β₁ weight ``1−β₁``, and (AMSGrad) where the stored maximum beats this
        step's ``v``."""
        h: AdamHyper = self.hyper(key)
        beta1, beta2 = h.betas
        t = self._step(key)
        if h.weight_decay != 0 and not h.decoupled_weight_decay:
            g = g.add(p, alpha=h.weight_decay)
        st = self.state(key)
        exp_avg = st.get("exp_avg")
        exp_avg_sq = st.get("exp_avg_sq")
        # two fresh buffers per call, the rest in place: at 100M+ parameters the passes over
        # memory, not the arithmetic, are what a counterfactual step costs
        m_new = g.mul(1 - beta1) if exp_avg is None else exp_avg.lerp(g, 1 - beta1)
        v_new = g.mul(g).mul_(1 - beta2) if exp_avg_sq is None else exp_avg_sq.mul(beta2).addcmul_(g, g, value=1 - beta2)
        stored = None
        if h.amsgrad and st.get("max_exp_avg_sq") is not None:
            stored = st["max_exp_avg_sq"] > v_new
            torch.maximum(st["max_exp_avg_sq"], v_new, out=v_new)
        return m_new, v_new.sqrt_().div_(math.sqrt(1 - beta2**t)), h.lr / (1 - beta1**t), 1 - beta1, stored

    def _step(self, key: str) -> float:
        """``t``, the number of the coming step (1 at the first)."""
        st = self.state(key)
        return (float(st["step"]) if "step" in st else 0.0) + 1

    def _unit_displacement(self, key: str, p: Tensor, rl_grad: Tensor, mtp_grad: Tensor) -> Tensor:
        """``δ₁ = dδ/dλ`` at ``λ = 0`` for parameter ``key`` (module docstring)."""
        h: AdamHyper = self.hyper(key)
        beta2 = h.betas[1]
        m, root, step_size, w1, stored = self._moments_raw(key, p, rl_grad)
        g = rl_grad if h.weight_decay == 0 or h.decoupled_weight_decay else rl_grad.add(p, alpha=h.weight_decay)
        denom = root.add(h.eps)
        # d√v̂/dλ = (1−β₂)·G·g_MTP / ((1−β₂ᵗ)·√v̂): the second moment's path
        d_root = g.mul(mtp_grad).mul_((1 - beta2) / (1 - beta2 ** self._step(key)))
        d_root.div_(root).masked_fill_(root == 0, 0.0)  # v = 0 only where m = 0: no second-moment term
        if stored is not None:
            d_root.masked_fill_(stored, 0.0)  # AMSGrad's stored maximum does not depend on λ
        first = mtp_grad.mul(w1).div_(denom)
        return first.sub_(m.mul_(d_root).div_(denom).div_(denom)).mul_(-step_size)

    def _decay(self, key: str, p: Tensor) -> Tensor | None:
        h: AdamHyper = self.hyper(key)
        if h.weight_decay != 0 and h.decoupled_weight_decay:
            return p.mul(-h.lr * h.weight_decay)
        return None

    def update(self, params: Params, grads: Params) -> Params:
        """``u = θ_new − θ`` of one Adam/AdamW step with ``grads`` (of a loss)."""
        out = {}
        for key, p in params.items():
            if self.hyper(key) is None:
                out[key] = torch.zeros_like(p)
                continue
            p = p.detach()
            m_new, denom, step_size, _ = self._moments(key, p, grads[key])
            u = m_new.div_(denom).mul_(-step_size)
            decay = self._decay(key, p)
            out[key] = u if decay is None else u.add_(decay)
        return out

    def counterfactual(
        self, params: Params, rl_grads: Params, mtp_grads: Params, coef: float
    ) -> Counterfactual:
        update_rl, unit, disp = {}, {}, {}
        for key, p in params.items():
            if self.hyper(key) is None:
                update_rl[key] = unit[key] = disp[key] = torch.zeros_like(p)
                continue
            p = p.detach()
            m_rl, denom_rl, step_size, w1 = self._moments(key, p, rl_grads[key])
            adaptive_rl = m_rl.div_(denom_rl).mul_(-step_size)
            decay = self._decay(key, p)
            update_rl[key] = adaptive_rl if decay is None else adaptive_rl.add(decay)
            # The decoupled decay term is the same in u and u_RL; leaving it out of both keeps
            # δ free of the cancellation error of subtracting two nearly equal updates.
            m_full, denom_full, _, _ = self._moments(key, p, mtp_grads[key].mul(coef).add_(rl_grads[key]))
            disp[key] = m_full.div_(denom_full).mul_(-step_size).sub_(adaptive_rl)
            unit[key] = self._unit_displacement(key, p, rl_grads[key], mtp_grads[key])
        return Counterfactual(update_rl, disp, unit)

    def displacement(self, params: Params, rl_grads: Params, mtp_grads: Params, coef: float,
                     update_rl: Params) -> Params:
        """``δ(λ) = u(λ) − u_RL`` alone, given ``u_RL`` from :meth:`counterfactual` (one pass over
        the state per coefficient: what a search over ``λ`` repeats). Parameters that share
        hyperparameters and step count go through multi-tensor (``_foreach``) operations."""
        out: Params = {}
        for (h, t), keys in self._groups(params).items():
            if h is None:
                out.update({k: torch.zeros_like(params[k]) for k in keys})
            elif h.amsgrad or (h.weight_decay != 0 and not h.decoupled_weight_decay) or any(
                self.state(k).get("exp_avg") is None for k in keys
            ):
                out.update({k: self._displacement_one(k, params[k].detach(), rl_grads[k], mtp_grads[k], coef,
                                                      update_rl[k]) for k in keys})
            else:
                for part in bounded_runs(keys, params, GROUP_ELEMENTS):
                    out.update(zip(part, self._displacement_group(h, t, part, params, rl_grads, mtp_grads, coef,
                                                                  update_rl), strict=True))
        return out

    def displacements(self, params: Params, rl_grads: Params, mtp_grads: Params, coefs: list[float],
                      update_rl: Params) -> Params:
        """:meth:`displacement` at every coefficient of ``coefs`` at once, ``[K, *shape]`` per
        parameter: the same step rule, broadcast over the coefficients' axis (one pass over the
        state for all of them, where :meth:`displacement` makes one per coefficient)."""
        out: Params = {}
        for (h, t), keys in self._groups(params).items():
            for key in keys:
                p = params[key].detach()
                if h is None:
                    out[key] = p.new_zeros((len(coefs), *p.shape))
                elif h.amsgrad or (h.weight_decay != 0 and not h.decoupled_weight_decay) or \
                        self.state(key).get("exp_avg") is None:
                    out[key] = torch.stack([self._displacement_one(key, p, rl_grads[key], mtp_grads[key], c,
                                                                   update_rl[key]) for c in coefs])
                else:
                    out[key] = self._displacements_key(h, t, key, p, rl_grads[key], mtp_grads[key], coefs,
                                                       update_rl[key])
        return out

    def _displacements_key(self, h: AdamHyper, t: float, key: str, p: Tensor, rl_grad: Tensor, mtp_grad: Tensor,
                           coefs: list[float], update_rl: Tensor) -> Tensor:
        """:meth:`_displacement_group`'s arithmetic for one parameter at ``K`` coefficients."""
        beta1, beta2 = h.betas
        lam = torch.tensor(coefs, dtype=rl_grad.dtype, device=rl_grad.device).view(-1, *[1] * rl_grad.dim())
        grad = torch.addcmul(rl_grad, lam, mtp_grad)  # g_RL + λ·g_MTP for every λ
        st = self.state(key)
        m = torch.lerp(st["exp_avg"].expand_as(grad), grad, 1 - beta1)
        v = torch.addcmul(st["exp_avg_sq"].mul(beta2), grad, grad, value=1 - beta2)
        v.sqrt_().div_(math.sqrt(1 - beta2**t)).add_(h.eps)
        m.div_(v).mul_(-h.lr / (1 - beta1**t))
        adaptive_rl = update_rl if h.weight_decay == 0 else update_rl.add(p, alpha=h.lr * h.weight_decay)
        return m.sub_(adaptive_rl)

    def _groups(self, params: Params) -> dict[tuple[AdamHyper | None, float], list[str]]:
        groups: dict[tuple[AdamHyper | None, float], list[str]] = {}
        for key in params:
            groups.setdefault((self.hyper(key), self._step(key)), []).append(key)
        return groups

    def _displacement_one(self, key: str, p: Tensor, rl_grad: Tensor, mtp_grad: Tensor, coef: float,
                          update_rl: Tensor) -> Tensor:
        m_full, denom_full, step_size, _ = self._moments(key, p, mtp_grad.mul(coef).add_(rl_grad))
        u = m_full.div_(denom_full).mul_(-step_size)
        decay = self._decay(key, p)
        return u.sub_(update_rl if decay is None else update_rl - decay)

    def _displacement_group(self, h: AdamHyper, t: float, keys: list[str], params: Params, rl_grads: Params,
                            mtp_grads: Params, coef: float, update_rl: Params) -> list[Tensor]:
        """The Adam step rule of :meth:`_moments` on lists of tensors (same ``h`` and ``t``)."""
        beta1, beta2 = h.betas
        grad = torch._foreach_add([rl_grads[k] for k in keys], [mtp_grads[k] for k in keys], alpha=coef)
        m = [self.state(k)["exp_avg"].clone() for k in keys]
        torch._foreach_lerp_(m, grad, 1 - beta1)
        v = torch._foreach_mul([self.state(k)["exp_avg_sq"] for k in keys], beta2)
        torch._foreach_addcmul_(v, grad, grad, value=1 - beta2)
        torch._foreach_sqrt_(v)
        torch._foreach_div_(v, math.sqrt(1 - beta2**t))
        torch._foreach_add_(v, h.eps)
        torch._foreach_div_(m, v)
        torch._foreach_mul_(m, -h.lr / (1 - beta1**t))
        adaptive_rl = [update_rl[k] for k in keys]
        if h.weight_decay != 0:  # u_RL holds the decoupled decay −η·w·θ; δ leaves it out
            adaptive_rl = torch._foreach_add(adaptive_rl, [params[k].detach() for k in keys], alpha=h.lr * h.weight_decay)
        torch._foreach_sub_(m, adaptive_rl)
        return m


# elements per multi-tensor pass of AdamW.displacement: its three temporaries stay bounded
# (2^25 float32 elements each) whatever the model's size, instead of growing with a whole
# parameter group, while a small model's tensors still go through one pass
GROUP_ELEMENTS = 1 << 25


def _group_hyper(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> SGDHyper | AdamHyper:
    """The hyperparameters of one ``torch.optim`` parameter group."""
    if isinstance(optimizer, torch.optim.SGD):
        return SGDHyper(lr=float(group["lr"]), momentum=float(group["momentum"]), dampening=float(group["dampening"]),
                        weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]))
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    return AdamHyper(lr=float(group["lr"]), betas=(float(group["betas"][0]), float(group["betas"][1])),
                     eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                     decoupled_weight_decay=bool(decoupled), amsgrad=bool(group["amsgrad"]))


def from_torch(optimizer: torch.optim.Optimizer, named_params: Mapping[str, Tensor]) -> SGD | AdamW:
    """Build a counterfactual copy of a live ``torch.optim`` optimizer.

    Args:
        optimizer: a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` instance (any param groups).
        named_params: ``dict(model.named_parameters())``; tensors are matched to the optimizer's
            by identity. Parameters the optimizer does not hold get a zero update.

    The state tensors are referenced, never modified; take the counterfactual before
    ``optimizer.step()`` mutates them.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    names = {id(t): k for k, t in named_params.items()}
    hyper: dict[str, Any] = {k: None for k in named_params}
    state: dict[str, Mapping[str, Any]] = {}
    is_sgd = isinstance(optimizer, torch.optim.SGD)
    is_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    if not (is_sgd or is_adam):
        raise TypeError(
            f"unsupported optimizer {type(optimizer).__name__}; supported: SGD, Adam, AdamW"
        )
    matched = 0
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise ValueError("maximize=True is not supported: decomp models minimising −J + λ·L_MTP")
        group_hyper = _group_hyper(optimizer, group)
        for p in group["params"]:
            key = names.get(id(p))
            if key is None:
                continue
            matched += 1
            hyper[key] = group_hyper
            st = optimizer.state.get(p)
            if st:
                state[key] = st
    if matched == 0:
        raise ValueError(
            "none of named_params is held by the optimizer; pass dict(model.named_parameters()) "
            "with the live parameter tensors"
        )
    return SGD(hyper, state) if is_sgd else AdamW(hyper, state)
