"""Hessian-vector products, Hessian linear operators and eigenvalues through ``torch.func``.

All functions take a scalar function ``f(params) -> Tensor`` of a ``dict[str, Tensor]`` of
parameters (what ``torch.func.functional_call`` takes) and never form a Hessian.

Three exact HVP methods, all reverse-over-reverse or forward-over-reverse (docs/engineering.md §7):

- ``"autograd"`` (default): reverse-over-reverse with ``torch.autograd`` on leaf copies of the
  parameters, ``∇⟨∇f, v⟩`` (PyHessian's double backward, applied to the functional ``f``).
  One forward and a ``create_graph`` backward build the gradient's graph; every HVP at the same
  ``θ`` is one backward pass through it.
- ``"reverse"``: reverse-over-reverse through ``torch.func``, ``vjp(grad(f), θ)``.
- ``"forward"``: forward-over-reverse through ``torch.func``, ``jvp(grad(f), (θ,), (v,))``; each
  HVP is a fresh forward+backward pass carrying tangents.

All three give the same product (tested). ``"autograd"`` is the default because it is the fastest
and the leanest of the three in ``benchmarks/hvp_peers.py`` (``vjp∘grad`` through ``torch.func``
keeps more memory alive than a double backward; the figures are in ``benchmarks/results.md``).

Several products at one point: :meth:`SecondOrder.hvps`, in one batched pass or one pass per
tangent by a measured rule (:func:`batched_by_default`; docs/benchmarks.md "Batched HVPs").

PyTorch's fused CPU attention kernel has neither forward-mode AD nor double backward, so every
function here runs under :func:`math_attention`. Parameters ``f`` does not use get zeros.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from decomp.checks import Params, check_like, check_params, scalar_function

HVPMethod = Literal["autograd", "reverse", "forward"]
HVP_METHODS: tuple[str, ...] = ("autograd", "reverse", "forward")
DEFAULT_HVP_METHOD: HVPMethod = "autograd"


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Select PyTorch's math SDPA backend, the one that supports forward AD and double backward."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextlib.contextmanager
def any_attention() -> Iterator[None]:
    """Let PyTorch pick its fastest SDPA backend again (e.g. inside :func:`math_attention`): for
    forward-only evaluations, where nothing differentiates through attention."""
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                      SDPBackend.MATH]):
        yield


def _check_method(method: str) -> HVPMethod:
    if method not in HVP_METHODS:
        raise ValueError(f"method must be one of {HVP_METHODS}, got {method!r}")
    return method  # type: ignore[return-value]


def _detached(params: Params) -> Params:
    # Measurements differentiate through functional copies, never through the live parameters'
    # autograd graph, so nothing here can leak into a training step's .grad.
    return {k: v.detach() for k, v in params.items()}


@dataclass
class SecondOrder:
    """Value, gradient and an HVP callable of ``f`` at fixed ``params``.

    The callable is valid while ``params`` are unchanged: the graph shares their storage, and
    after an in-place update (an optimizer step) a further call raises autograd's version error
    rather than returning a product at a stale point.

    ``hvp(v)`` returns ``∇²f(params) · v`` as a dict; with the ``"autograd"`` and ``"reverse"``
    methods all calls reuse one graph (built once), with ``"forward"`` each call is a fresh
    ``jvp`` pass.

    ``hvps(vs)`` returns ``[hvp(v) for v in vs]``, in one batched pass carrying every tangent at
    once where ``batched`` says so (:meth:`hvps`).
    """

    value: Tensor
    grad: Params
    hvp: Callable[[Params], Params]
    method: HVPMethod
    batched_hvps: Callable[[list[Params]], list[Params]] | None = None
    batched: bool | None = None  # hvps' default: None → the measured rule, batched_by_default

    def hvps(self, vs: Sequence[Params], *, batched: bool | None = None) -> list[Params]:
        """``[hvp(v) for v in vs]``: the same products (to rounding), one per tangent.

        ``batched`` (default: the ``batched`` given to :func:`second_order`, else the measured
        rule :func:`batched_by_default`): ``True`` computes them in one pass carrying every
        tangent (``torch.autograd.grad(..., is_grads_batched=True)`` for ``"autograd"``,
        ``torch.func.vmap`` over the tangents for ``"reverse"`` and ``"forward"``), which holds
        ``len(vs)`` products and the pass's batched intermediates at once; ``False`` one pass per
        tangent, one pass's intermediates alive at a time (the products are all returned).
        Fewer than two tangents are always sequential."""
        vs = list(vs)
        use = self.batched if batched is None else batched
        if use is None:
            use = batched_by_default(self.method, self.grad)
        if len(vs) < 2 or not use or self.batched_hvps is None:
            return [self.hvp(v) for v in vs]
        return self.batched_hvps(vs)


def batched_by_default(method: HVPMethod, params: Params) -> bool:
    """The measured rule of :meth:`SecondOrder.hvps` (``benchmarks/hvp_batched.py``, figures in
    docs/benchmarks.md "Batched HVPs"): batched for the ``"forward"`` method, where ``vmap`` over
    the tangents of one ``jvp∘grad`` pass beat two passes (0.75× on the built-in model, 0.83× on
    SmolLM2-135M); sequential for ``"autograd"`` (``is_grads_batched`` runs the legacy vmap
    prototype, whose per-tangent fallbacks for the softmax, GELU, embedding and gather backwards
    made two batched products slower than two backward passes: 1.15× and 1.36×) and
    ``"reverse"`` (no faster batched on the built-in model). ``params`` (unused by the present
    rule) lets a rule depend on the model. Measured on a CPU only."""
    del params
    return method == "forward"


def _stacked(vs: list[Params], keys: Sequence[str]) -> Params:
    return {k: torch.stack([v[k] for v in vs]) for k in keys}


def _unstacked(stacked: Params, n: int) -> list[Params]:
    return [{k: t[i] for k, t in stacked.items()} for i in range(n)]


def second_order(
    f: Callable[[Params], Tensor],
    params: Params,
    *,
    method: HVPMethod = DEFAULT_HVP_METHOD,
    name: str = "f",
    batched: bool | None = None,
) -> SecondOrder:
    """Compute ``f(θ)``, ``∇f(θ)`` and return an exact HVP callable at ``θ``.

    This is the work-sharing primitive of the decomposition: one double pass gives the gradient
    and every HVP needed afterwards. ``batched`` is the default of :meth:`SecondOrder.hvps`
    (``None``: the measured rule :func:`batched_by_default`).
    """
    params = check_params(params)
    method = _check_method(method)
    f = scalar_function(f, name)
    theta = _detached(params)
    if batched is not None and not isinstance(batched, bool):
        raise TypeError(f"batched must be True, False or None, got {batched!r}")

    def checked(vs: list[Params]) -> list[Params]:
        return [check_like(v, params, f"vs[{i}]") for i, v in enumerate(vs)]

    if method == "autograd":
        value, g, hvp_fn, hvps_fn = _autograd_second_order(f, theta, retain=True)

        def hvp_autograd(v: Params) -> Params:
            return hvp_fn(check_like(v, params, "v"))

        return SecondOrder(value=value, grad=g, hvp=hvp_autograd, method=method,
                           batched_hvps=lambda vs: hvps_fn(checked(vs)), batched=batched)

    if method == "reverse":
        with math_attention():
            g, vjp_fn, value = vjp(grad_and_value(f), theta, has_aux=True)

        def hvp_reverse(v: Params) -> Params:
            v = check_like(v, params, "v")
            with math_attention():
                (hv,) = vjp_fn(v)
            return hv

        def hvps_reverse(vs: list[Params]) -> list[Params]:
            vs = checked(vs)
            with math_attention():
                (hv,) = vmap(vjp_fn)(_stacked(vs, list(theta)))
            return _unstacked(hv, len(vs))

        return SecondOrder(value=value.detach(), grad=g, hvp=hvp_reverse, method=method,
                           batched_hvps=hvps_reverse, batched=batched)

    with math_attention():
        g, value = grad_and_value(f)(theta)

    def hvp_forward(v: Params) -> Params:
        v = check_like(v, params, "v")
        with math_attention():
            _, hv = jvp(grad(f), (theta,), (v,))
        return hv

    def hvps_forward(vs: list[Params]) -> list[Params]:
        vs = checked(vs)
        with math_attention():  # the primal gradient is computed once, the tangents batched
            hv = vmap(lambda v: jvp(grad(f), (theta,), (v,))[1])(_stacked(vs, list(theta)))
        return _unstacked(hv, len(vs))

    return SecondOrder(value=value.detach(), grad=g, hvp=hvp_forward, method=method,
                       batched_hvps=hvps_forward, batched=batched)


def _autograd_second_order(
    f: Callable[[Params], Tensor], theta: Params, *, retain: bool
) -> tuple[Tensor, Params, Callable[[Params], Params], Callable[[list[Params]], list[Params]]]:
    """``f(θ)``, ``∇f(θ)``, an HVP callable by double backward on leaf copies of ``θ``, and one
    for several tangents in one batched backward (``is_grads_batched``)."""
    leaves = {k: t.detach().requires_grad_(True) for k, t in theta.items()}
    names = list(leaves)
    with torch.enable_grad(), math_attention():
        value = f(leaves)
        grads = torch.autograd.grad(value, list(leaves.values()), create_graph=True, allow_unused=True)
    g = {k: torch.zeros_like(leaves[k]) if gi is None else gi.detach() for k, gi in zip(names, grads, strict=True)}
    # a gradient that does not depend on θ (f linear in that tensor) has no Hessian term
    live = [(k, gi) for k, gi in zip(names, grads, strict=True) if gi is not None and gi.requires_grad]

    def hvp_fn(v: Params) -> Params:
        if not live:
            return {k: torch.zeros_like(leaves[k]) for k in names}
        with torch.enable_grad(), math_attention():
            out = torch.autograd.grad(
                [gi for _, gi in live], list(leaves.values()), grad_outputs=[v[k] for k, _ in live],
                retain_graph=retain, allow_unused=True,
            )
        return {k: torch.zeros_like(leaves[k]) if o is None else o for k, o in zip(names, out, strict=True)}

    def hvps_fn(vs: list[Params]) -> list[Params]:
        if not live:
            return [{k: torch.zeros_like(leaves[k]) for k in names} for _ in vs]
        with torch.enable_grad(), math_attention():
            out = torch.autograd.grad(
                [gi for _, gi in live], list(leaves.values()),
                grad_outputs=[torch.stack([v[k] for v in vs]) for k, _ in live],
                retain_graph=retain, allow_unused=True, is_grads_batched=True,
            )
        return [{k: torch.zeros_like(leaves[k]) if o is None else o[i] for k, o in zip(names, out, strict=True)}
                for i in range(len(vs))]

    return value.detach(), g, hvp_fn, hvps_fn


def hvp(
    f: Callable[[Params], Tensor],
    params: Params,
    v: Params,
    *,
    method: HVPMethod = DEFAULT_HVP_METHOD,
) -> Params:
    """Exact Hessian-vector product ``∇²f(θ) · v`` of a scalar ``f`` at ``θ = params``.

    Args:
        f: scalar function of a ``dict[str, Tensor]``.
        params: the point ``θ``.
        v: a direction with the keys, shapes and dtypes of ``params``.
        method: ``"autograd"`` (double backward, default), ``"reverse"`` (``vjp∘grad``) or
            ``"forward"`` (``jvp∘grad``).

    Returns:
        ``dict`` with the keys of ``params``; zeros for parameters ``f`` does not use.
    """
    params = check_params(params)
    v = check_like(v, params, "v")
    method = _check_method(method)
    f_checked = scalar_function(f, "f")
    theta = _detached(params)
    if method == "autograd":  # a single product: the backward frees the graph as it goes
        return _autograd_second_order(f_checked, theta, retain=False)[2](v)
    with math_attention():
        if method == "forward":
            _, hv = jvp(grad(f_checked), (theta,), (v,))
            return hv
        _, vjp_fn = vjp(grad(f_checked), theta)
        (hv,) = vjp_fn(v)
        return hv


DOT_BLOCK = 1 << 18  # elements per block: a block's float64 copies (2 MiB each) stay in cache
DOT_SMALL = 1 << 16  # below this, per-operation overhead dominates: all such tensors in one vector


def dots(pairs: Sequence[tuple[Params, Params]]) -> list[float]:
    """``[⟨a, b⟩ for (a, b) in pairs]``, each summed over all tensors with exact float64 products
    and float64 accumulation; the dicts share their keys.

    Each operand is converted to float64 once for all the pairs it appears in (``dots([(g, δ),
    (g, δ₁)])`` converts ``g`` once; ``⟨a, a⟩`` once): tensors under ``DOT_SMALL`` elements are
    concatenated into one float64 vector per operand (a handful of operations instead of a few
    per tensor, which on a small model had cost more than the products), larger ones are
    converted one cache-sized block (``DOT_BLOCK`` elements) at a time (converting whole
    100M-parameter dicts had cost more than the HVPs).
    """
    if not pairs:
        return []
    like = pairs[0][0]
    totals: list[list[Tensor]] = [[] for _ in pairs]
    for group in bounded_runs([k for k, t in like.items() if t.numel() < DOT_SMALL], like, DOT_BLOCK):
        _accumulate(totals, pairs, lambda d, group=group: [torch.cat([d[k].reshape(-1) for k in group])])
    for k in (k for k, t in like.items() if t.numel() >= DOT_SMALL):
        _accumulate(totals, pairs, lambda d, k=k: d[k].reshape(-1).split(DOT_BLOCK))
    return [float(torch.stack(t).sum()) if t else 0.0 for t in totals]


def bounded_runs(keys: list[str], params: Params, elements: int) -> list[list[str]]:
    """``keys`` in consecutive runs of at most ``elements`` elements of ``params``, each on one
    device (a larger tensor alone): one multi-tensor operation per run keeps its temporaries
    bounded whatever the model's size (:func:`dots`, ``decomp.optim.AdamW.displacement``)."""
    runs: list[list[str]] = []
    size, device = 0, None
    for key in keys:
        t = params[key]
        if not runs or size + t.numel() > elements or t.device != device:
            runs.append([])
            size, device = 0, t.device
        runs[-1].append(key)
        size += t.numel()
    return runs


def _accumulate(totals: list[list[Tensor]], pairs: Sequence[tuple[Params, Params]],
                pieces: Callable[[Params], Sequence[Tensor]]) -> None:
    """Append each pair's float64 dot products over ``pieces`` of its operands to ``totals``,
    converting every distinct operand's piece once."""
    operands = {id(d): d for pair in pairs for d in pair}
    split = {i: pieces(d) for i, d in operands.items()}
    for j in range(len(next(iter(split.values())))):
        wide = {i: p[j].to(torch.float64) for i, p in split.items()}
        for total, (a, b) in zip(totals, pairs, strict=True):
            total.append(torch.dot(wide[id(a)], wide[id(b)]))


def dot(a: Params, b: Params) -> float:
    """``⟨a, b⟩`` summed over all tensors, accumulated in float64 (:func:`dots`)."""
    return dots([(a, b)])[0]


def norm(a: Params) -> float:
    """Euclidean norm over all tensors of ``a``, accumulated in float64."""
    return dot(a, a) ** 0.5


def flatten(params: Params) -> Tensor:
    """Concatenate the tensors of ``params`` (in dict order) into one vector."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(vector: Tensor, like: Params) -> Params:
    """Inverse of :func:`flatten`: split ``vector`` into tensors shaped like ``like``."""
    out, start = {}, 0
    for key, ref in like.items():
        n = ref.numel()
        out[key] = vector[start : start + n].reshape(ref.shape).to(dtype=ref.dtype, device=ref.device)
        start += n
    if start != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, params have {start}")
    return out


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def hessian_operator(
    f: Callable[[Params], Tensor],
    params: Params,
    *,
    method: HVPMethod = DEFAULT_HVP_METHOD,
) -> LinearOperator:
    """``∇²f(θ)`` as a SciPy ``LinearOperator`` over the flattened parameters (dict order).

    With the ``"autograd"`` (default) and ``"reverse"`` methods the gradient graph is built once
    and every ``matvec`` is one backward pass through it (as PyHessian does), so Lanczos
    iterations are cheap.
    """
    params = check_params(params)
    dtype = next(iter(params.values())).dtype
    if dtype not in _NUMPY_DTYPES or any(p.dtype != dtype for p in params.values()):
        raise TypeError("hessian_operator needs all params in one dtype, float32 or float64")
    so = second_order(f, params, method=method)
    n = sum(p.numel() for p in params.values())
    device = next(iter(params.values())).device

    def matvec(x: np.ndarray) -> np.ndarray:
        vec = torch.as_tensor(np.asarray(x).reshape(-1), dtype=dtype, device=device)
        hv = so.hvp(unflatten(vec, params))
        return flatten(hv).detach().cpu().numpy()

    return LinearOperator((n, n), matvec=matvec, rmatvec=matvec, dtype=_NUMPY_DTYPES[dtype])


def top_eigenvalues(
    f: Callable[[Params], Tensor],
    params: Params,
    k: int = 1,
    *,
    which: Literal["LA", "SA", "LM", "BE"] = "LA",
    tol: float = 1e-6,
    maxiter: int | None = None,
    seed: int = 0,
    return_eigenvectors: bool = False,
    method: HVPMethod = DEFAULT_HVP_METHOD,
) -> np.ndarray | tuple[np.ndarray, list[Params]]:
    """Extreme eigenvalues of ``∇²f(θ)`` by Lanczos (``scipy.sparse.linalg.eigsh``).

    Args:
        k: how many eigenvalues.
        which: ``"LA"`` largest algebraic (default), ``"SA"`` smallest algebraic (most negative:
            the directions along which a maximised ``J`` is most concave), ``"LM"`` largest
            magnitude, ``"BE"`` both ends (``k ≥ 2``; half from each end, one Lanczos run).
        tol: relative accuracy of the Ritz values passed to ``eigsh``.
        seed: seeds the Lanczos start vector, so results are reproducible.
        return_eigenvectors: also return the eigenvectors as parameter dicts.

    Returns:
        Eigenvalues sorted in descending order (and eigenvectors in the same order).
    """
    params = check_params(params)
    n = sum(p.numel() for p in params.values())
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k >= n:
        raise ValueError(f"k must be smaller than the number of parameters ({n}), got {k}")
    if which not in ("LA", "SA", "LM", "BE"):
        raise ValueError(f"which must be 'LA', 'SA', 'LM' or 'BE', got {which!r}")
    if which == "BE" and k < 2:
        raise ValueError("which='BE' needs k >= 2 (one eigenvalue from each end)")
    op = hessian_operator(f, params, method=method)
    v0 = np.random.default_rng(seed).standard_normal(n).astype(op.dtype)
    if not np.any(op.matvec(v0)):
        # H·v0 = 0 for a random v0: H = 0 (e.g. an objective that is constant on this batch).
        # ARPACK cannot start from that; every eigenvalue is 0.
        values = np.zeros(k)
        vectors = np.linalg.qr(np.random.default_rng(seed + 1).standard_normal((n, k)))[0]
    else:
        values, vectors = eigsh(op, k=k, which=which, tol=tol, maxiter=maxiter, v0=v0)
    order = np.argsort(values)[::-1]
    values = values[order]
    if not return_eigenvectors:
        return values
    like = {key: p.detach() for key, p in params.items()}
    vecs = [unflatten(torch.as_tensor(vectors[:, i].copy()), like) for i in order]
    return values, vecs


def rayleigh_quotient(
    f: Callable[[Params], Tensor],
    params: Params,
    v: Params,
    *,
    method: HVPMethod = DEFAULT_HVP_METHOD,
) -> float:
    """``vᵀ∇²f(θ)v / vᵀv``: where direction ``v`` sits in the Hessian's spectrum.

    Compare it with :func:`top_eigenvalues` (``which="LA"`` and ``"SA"``) to place, for example,
    the MTP displacement ``δ`` between the extreme curvatures of ``J``.
    """
    params = check_params(params)
    v = check_like(v, params, "v")
    vv = dot(v, v)
    if vv == 0.0:
        raise ValueError("v is the zero vector; its Rayleigh quotient is undefined")
    return dot(v, hvp(f, params, v, method=method)) / vv


def jvp_logprobs(
    logprob_fn: Callable[[Params], Tensor],
    params: Params,
    v: Params,
    *,
    with_value: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Forward-mode directional derivative ``∇ℓ_t(θ) · v`` of per-token log-probs.

    ``logprob_fn(params)`` returns a tensor of per-token log-probs (any shape, e.g. ``[B, T]``);
    the result has the same shape. One forward pass carrying a tangent, no Hessian: this is the
    ``jvp`` level of the estimator ladder (docs/estimators.md §4). ``with_value=True`` returns
    ``(ℓ(θ), ∇ℓ·v)``: the log-probs come with the pass, so no second forward is needed for them.
    """
    theta, (v,) = _jvp_inputs(logprob_fn, params, [v], ["v"])
    with math_attention():
        value, tangent = jvp(logprob_fn, (theta,), (v,))
    return (value.detach(), tangent) if with_value else tangent


def _jvp_inputs(logprob_fn: Callable[[Params], Tensor], params: Params, tangents: list[Params],
                names: list[str]) -> tuple[Params, list[Params]]:
    """Detached ``params`` and the checked tangents of a forward-mode pass."""
    params = check_params(params)
    tangents = [check_like(v, params, name) for v, name in zip(tangents, names, strict=True)]
    if not callable(logprob_fn):
        raise TypeError(f"logprob_fn must be callable, got {type(logprob_fn).__name__}")
    return _detached(params), tangents


def jvp_logprobs_batched(logprob_fn: Callable[[Params], Tensor], params: Params,
                         directions: list[Params]) -> tuple[Tensor, list[Tensor]]:
    """``(ℓ(θ), [∇ℓ_t(θ) · v for v in directions])`` from one forward-mode pass carrying every
    tangent at once (``torch.func.vmap`` over the tangent of :func:`jvp_logprobs`; the primal is
    computed once).

    Worth it where each operation's overhead dominates, not its arithmetic: faster than two passes
    on the built-in model, slower on a real LM on CPU (the jvp rows of
    ``benchmarks/decomposition_cost*.py``; figures in ``benchmarks/results.md``). It also holds the
    tangents stacked: ``len(directions)`` parameter-sized copies.
    """
    if not directions:
        raise ValueError("directions is empty")
    theta, tangents = _jvp_inputs(logprob_fn, params, directions,
                                  [f"directions[{i}]" for i in range(len(directions))])
    stacked = {k: torch.stack([v[k] for v in tangents]) for k in theta}
    with math_attention():
        values, products = vmap(lambda v: jvp(logprob_fn, (theta,), (v,)))(stacked)
    return values[0].detach(), list(products.unbind(0))
