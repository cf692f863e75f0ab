"""The training batch's side of a step: ``∇L_MTP``, the RL update's loss gradient and the
counterfactual updates ``u_RL``, ``δ``, ``δ₁`` through the live optimizer (docs/method.md §3.1).

:func:`step_updates` builds them once (first-order passes only); every evaluation objective of
:mod:`decomp.decomposition` and every coefficient rule of :mod:`decomp.rules` then shares them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from decomp import optim as cf_optim
from decomp.checks import Params, check_like, check_number, check_params, scalar_function
from decomp.curvature import any_attention, math_attention, norm

OptimizerSpec = str | torch.optim.Optimizer | cf_optim.SGD | cf_optim.AdamW
OPTIMIZER_NAMES = ("sgd", "adamw", "adam")


def resolve_optimizer(
    optimizer: OptimizerSpec,
    optimizer_state: cf_optim.State | None,
    lr: float | None,
    params: Params,
) -> cf_optim.SGD | cf_optim.AdamW:
    if isinstance(optimizer, str):
        name = optimizer.lower()
        if name not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer must be one of {OPTIMIZER_NAMES} or an optimizer object, got {optimizer!r}")
        if lr is None:
            raise ValueError("lr is required when optimizer is given by name")
        if name == "sgd":
            if optimizer_state:
                raise ValueError(
                    "optimizer='sgd' is plain gradient descent and takes no optimizer_state; "
                    "pass decomp.optim.SGD(...) or the torch optimizer for momentum"
                )
            return cf_optim.SGD(cf_optim.SGDHyper(lr=lr))
        if name == "adamw":
            return cf_optim.AdamW(cf_optim.AdamHyper(lr=lr), optimizer_state)
        return cf_optim.AdamW(
            cf_optim.AdamHyper(lr=lr, weight_decay=0.0, decoupled_weight_decay=False), optimizer_state
        )
    if optimizer_state is not None:
        raise ValueError("optimizer_state is only used with an optimizer given by name")
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = cf_optim.from_torch(optimizer, params)
    elif isinstance(optimizer, (cf_optim.SGD, cf_optim.AdamW)):
        opt = optimizer
    else:
        raise TypeError(
            "optimizer must be 'sgd', 'adamw', 'adam', a torch.optim optimizer or a "
            f"decomp.optim optimizer, got {type(optimizer).__name__}"
        )
    return opt.with_lr(lr) if lr is not None else opt


def finite_norm(d: Params, what: str) -> float:
    """‖d‖ (float64 accumulation); a NaN or infinity anywhere makes it non-finite, so checking
    it replaces a separate pass over every tensor."""
    value = norm(d)
    if not math.isfinite(value):
        bad = next((k for k, t in d.items() if not bool(torch.isfinite(t).all())), "?")
        raise ValueError(f"{what} is not finite at parameter {bad!r}")
    return value


@dataclass(frozen=True)
class StepUpdates:
    """The training batch's side of a step, shared by every evaluation objective.

    ``updates`` holds ``u_RL``, ``δ`` and ``δ₁`` (e.g. for the ``jvp`` estimators of
    :mod:`decomp.occ`); ``grad_mtp`` is ``∇L_MTP``, ``update_grad`` the loss gradient the
    optimizer stepped on for ``u_RL`` (``−∇J`` of the training batch, or ``∇rl_loss``).
    """

    theta: Params  # detached parameters
    updates: cf_optim.Counterfactual | None  # None until completed by the in-sample J's gradient
    grad_mtp: Params
    update_grad: Params | None
    mtp_value: float
    grad_norm_mtp: float
    coef: float
    optimizer: cf_optim.SGD | cf_optim.AdamW  # the resolved counterfactual optimizer
    devices: list[int]  # CUDA devices whose RNG a measurement forks
    shared: frozenset[str] | None = None  # the parameters the cosine is taken over (None: all)

    @property
    def reads(self) -> list[str]:
        """The parameters ``J`` reads, in ``theta``'s order: the policy's (``shared``; ``J`` never
        reads the MTP module's own), else every one. The passes through ``J`` move, stack and
        differentiate these alone; a tangent that is 0 on them moves nothing (:func:`moves`)."""
        return [k for k in self.theta if self.shared is None or k in self.shared]

    def completed(self, grad_j: Params) -> StepUpdates:
        """The updates for ``u_RL`` following ``−∇J`` (in-sample ``J`` and no ``rl_loss``), from
        ``J``'s own gradient, so that it is computed once."""
        update_grad = {k: -v for k, v in grad_j.items()}
        cf = self.optimizer.counterfactual(self.theta, update_grad, self.grad_mtp, self.coef)
        return dataclasses.replace(self, updates=cf, update_grad=update_grad)

    def displacement(self, coef: float) -> Params:
        """``δ(λ)`` of a real counterfactual step at ``λ = coef``."""
        if coef == self.coef:
            return self.updates.displacement
        return self.optimizer.displacement(self.theta, self.update_grad, self.grad_mtp, coef, self.updates.update_rl)

    def displacements(self, coefs: list[float], keys: list[str] | None = None) -> Params:
        """:meth:`displacement` at every coefficient of ``coefs``, stacked ``[K, *shape]`` per
        parameter (one pass of the optimizer's rule for all of them), of the parameters ``keys``
        (``None``: all); the step's own ``λ`` gets the step's own ``δ``, as :meth:`displacement`
        gives it."""
        theta = self.theta if keys is None else {k: self.theta[k] for k in keys}
        out = self.optimizer.displacements(theta, self.update_grad, self.grad_mtp, list(coefs),
                                           self.updates.update_rl)
        for i in (i for i, c in enumerate(coefs) if c == self.coef):
            for k, t in out.items():
                t[i] = self.updates.displacement[k]
        return out



def same_params(x: Params, y: Params) -> bool:
    """Whether two parameter dicts hold the same names and values, bit for bit (e.g. the ``u_RL``
    of two directions of one update)."""
    return x is y or (x.keys() == y.keys() and all(x[k] is y[k] or torch.equal(x[k], y[k]) for k in x))


def moves(tangent: Params, keys: Iterable[str]) -> bool:
    """Whether ``tangent`` is nonzero on any of the parameters ``keys`` (those ``J`` reads):
    where it is not, ``J`` at ``θ + tangent`` is ``J(θ)`` bit for bit and every derivative of
    ``J`` along it is 0 exactly (the ``detach`` direction's ``δ``: its ``∇L_MTP`` is 0 on the
    policy's parameters, so its step is ``u_RL``'s own arithmetic on the same gradient)."""
    return any(bool(tangent[k].ne(0).any()) for k in keys)


def step_updates(
    rl_objective: Callable[[Params], Tensor],
    mtp_loss: Callable[[Params], Tensor],
    params: Params,
    *,
    coef: float,
    lr: float | None = None,
    optimizer: OptimizerSpec = "sgd",
    optimizer_state: cf_optim.State | None = None,
    rl_loss: Callable[[Params], Tensor] | None = None,
    defer: bool = False,
    first_order: Callable[[Params], tuple[Tensor, Tensor]] | None = None,
    shared: Collection[str] | None = None,
    rl_grad: Params | None = None,
) -> StepUpdates:
    """The training batch's side of :func:`measure_step`: ``∇L_MTP``, the loss gradient of the
    RL update (``∇rl_loss``, or ``−∇J`` of ``rl_objective``), and the counterfactual ``u_RL``,
    ``δ(coef)`` and ``δ₁`` (first-order passes only).

    ``defer`` (only without ``rl_loss``) leaves ``−∇J`` and the updates to
    :func:`decompose_updates` on the same ``rl_objective``, whose second-order pass gives ``∇J``.
    ``first_order(params) -> (L_MTP, rl_loss)``, the same two losses from one forward pass (e.g.
    :attr:`decomp.objectives.Objectives.first_order`), gives both gradients from that one pass.
    ``shared``: the names of the parameters the policy and the MTP module share (e.g.
    ``model.shared_parameter_names()``); the decomposition's ``cosine`` is taken over them, as
    the ``cosine`` regime's gate is (the MTP module's own parameters, where ``∇J = 0``, would
    only dilute it). ``None``: over every parameter. ``rl_grad``: ``∇rl_loss`` when the caller has
    it (with ``rl_loss``): the directions of one update share their RL update, so each computes
    ``∇L_MTP`` alone and their ``u_RL`` agree bit for bit.
    """
    params = check_params(params)
    coef = check_number(coef, "coef")
    if lr is not None:
        lr = check_number(lr, "lr", nonnegative=True)
    opt = resolve_optimizer(optimizer, optimizer_state, lr, params)
    devices = sorted({p.device.index or 0 for p in params.values() if p.device.type == "cuda"})
    # first-order gradients only: the fused attention kernel (the training update's own) has a
    # backward and is faster than the math backend the second-order passes need
    with torch.random.fork_rng(devices=devices), any_attention():
        theta = {k: v.detach() for k, v in params.items()}
        if rl_grad is not None and rl_loss is not None:
            g_mtp, mtp_value = torch.func.grad_and_value(scalar_function(mtp_loss, "mtp_loss"))(theta)
            update_grad = check_like(rl_grad, theta, "rl_grad")
        elif first_order is not None and rl_loss is not None:
            g_mtp, mtp_value, update_grad = shared_first_order(first_order, theta)
        else:
            g_mtp, mtp_value = torch.func.grad_and_value(scalar_function(mtp_loss, "mtp_loss"))(theta)
            update_grad = None if rl_loss is None else torch.func.grad(scalar_function(rl_loss, "rl_loss"))(theta)
        if not math.isfinite(float(mtp_value)):
            raise ValueError(f"mtp_loss returned a non-finite value ({float(mtp_value)})")
        gn_mtp = finite_norm(g_mtp, "the gradient of mtp_loss")
        if shared is not None and not set(shared) <= set(theta):
            raise ValueError(f"shared names parameters that params lacks: {sorted(set(shared) - set(theta))[:3]}")
        step = StepUpdates(theta, None, g_mtp, None, float(mtp_value), gn_mtp, coef, opt, devices,
                           None if shared is None else frozenset(shared))
        if update_grad is not None:
            finite_norm(update_grad, "the gradient of rl_loss")
            cf = opt.counterfactual(theta, update_grad, g_mtp, coef)
            return dataclasses.replace(step, updates=cf, update_grad=update_grad)
        if defer:
            return step
        with math_attention():  # J's gradient as its second-order pass computes it: the same bits
            grad_j = torch.func.grad(scalar_function(rl_objective, "rl_objective"))(theta)
        finite_norm(grad_j, "the gradient of rl_objective")
        return step.completed(grad_j)


def shared_first_order(first_order: Callable[[Params], tuple[Tensor, Tensor]], theta: Params
                        ) -> tuple[Params, Tensor, Params]:
    """``∇L_MTP``, ``L_MTP`` and ``∇rl_loss`` from one forward (two backward passes through its
    graph) on leaf copies of ``θ``; parameters a loss does not use get zeros."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    tensors = list(leaves.values())
    with torch.enable_grad():
        mtp_value, rl_value = first_order(leaves)
        for name, value in (("mtp_loss", mtp_value), ("rl_loss", rl_value)):
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(f"first_order must return two scalars; its {name} is not one")
        g_mtp = torch.autograd.grad(mtp_value, tensors, retain_graph=True, allow_unused=True)
        g_rl = torch.autograd.grad(rl_value, tensors, allow_unused=True)

    def as_dict(grads: tuple) -> Params:
        return {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(leaves.items(), grads, strict=True)}

    return as_dict(g_mtp), mtp_value.detach().reshape(()), as_dict(g_rl)
