"""HVPs, the Hessian operator, eigenvalues and JVPs against independent computations (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_problem

from decomp.curvature import (
    DOT_BLOCK,
    DOT_SMALL,
    batched_by_default,
    dot,
    dots,
    flatten,
    hessian_operator,
    hvp,
    jvp_logprobs,
    jvp_logprobs_batched,
    rayleigh_quotient,
    second_order,
    top_eigenvalues,
    unflatten,
)
from decomp.objectives import objectives
from decomp.regimes import CrossEntropy

METHODS = ["autograd", "reverse", "forward"]


def _quartic(seed: int = 0):
    """f(x) = (xᵀQx)² + Σ c_i x_i⁴ + bᵀx over x = [vec(W); b0] split into a dict."""
    rng = np.random.default_rng(seed)
    n = 10
    Q = rng.standard_normal((n, n))
    Q = Q + Q.T
    c = rng.standard_normal(n)
    bvec = rng.standard_normal(n)
    x = rng.standard_normal(n)
    Qt, ct, bt = (torch.tensor(a) for a in (Q, c, bvec))
    params = {"W": torch.tensor(x[:6]).reshape(3, 2), "b0": torch.tensor(x[6:])}

    def f(p):
        z = torch.cat([p["W"].reshape(-1), p["b0"]])
        return (z @ Qt @ z) ** 2 + (ct * z**4).sum() + bt @ z

    s = x @ Q @ x
    H = 8 * np.outer(Q @ x, Q @ x) + 4 * s * Q + np.diag(12 * c * x**2)
    return f, params, H


def _rand_like(params, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


@pytest.mark.parametrize("method", METHODS)
def test_hvp_matches_analytic_hessian_on_quartic(method):
    f, params, H = _quartic()
    v = _rand_like(params, 1)
    hv = flatten(hvp(f, params, v, method=method)).numpy()
    expected = H @ flatten(v).numpy()
    np.testing.assert_allclose(hv, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())


def _joint(problem):
    """J − 0.3·L_MTP(ce): a function of every parameter, MTP module included."""
    obj = objectives(problem.model, problem.batch, CrossEntropy())
    return lambda p: obj.rl_objective(p) - 0.3 * obj.mtp_loss(p)


@pytest.mark.parametrize("method", METHODS)
def test_hvp_matches_finite_differences_on_mtp_transformer(method):
    problem = make_problem()
    f = _joint(problem)
    params = problem.params
    v = _rand_like(params, 2)
    hv = flatten(hvp(f, params, v, method=method))
    eps = 1e-5
    gp = torch.func.grad(f)({k: params[k] + eps * v[k] for k in params})
    gm = torch.func.grad(f)({k: params[k] - eps * v[k] for k in params})
    fd = (flatten(gp) - flatten(gm)) / (2 * eps)
    rel = float((hv - fd).norm() / fd.norm())
    assert rel <= 1e-6, rel
    # the MTP module really takes part in the product
    assert float(hvp(f, params, v, method=method)["mtp.0.proj.weight"].abs().max()) > 0


def test_hvp_is_symmetric_and_methods_agree():
    problem = make_problem(seed=3)
    f = _joint(problem)
    params = problem.params
    u, v = _rand_like(params, 4), _rand_like(params, 5)
    hv_rev = hvp(f, params, v, method="reverse")
    hv_fwd = hvp(f, params, v, method="forward")
    hv_auto = hvp(f, params, v, method="autograd")
    assert float((flatten(hv_auto) - flatten(hv_rev)).norm() / flatten(hv_rev).norm()) < 1e-12
    hu = hvp(f, params, u)
    uhv = sum(float((u[k] * hv_rev[k]).sum()) for k in params)
    vhu = sum(float((v[k] * hu[k]).sum()) for k in params)
    assert abs(uhv - vhu) <= 1e-10 * max(1.0, abs(uhv))
    diff = (flatten(hv_rev) - flatten(hv_fwd)).norm() / flatten(hv_rev).norm()
    assert float(diff) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_unused_parameters_get_zero_tensors(method):
    params = {"x": torch.tensor([1.0, 2.0], dtype=torch.float64), "unused": torch.ones(3, dtype=torch.float64)}
    v = {"x": torch.tensor([1.0, 0.0], dtype=torch.float64), "unused": torch.ones(3, dtype=torch.float64)}
    out = hvp(lambda p: (p["x"] ** 3).sum(), params, v, method=method)
    assert isinstance(out["unused"], torch.Tensor)
    assert torch.equal(out["unused"], torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(out["x"], torch.tensor([6.0, 0.0], dtype=torch.float64))


def test_hessian_operator_eigenvalues_and_rayleigh_quotient_match_dense():
    f, params, H = _quartic(seed=7)
    op = hessian_operator(f, params)
    n = H.shape[0]
    dense = np.column_stack([op.matvec(e) for e in np.eye(n)])
    np.testing.assert_allclose(dense, H, rtol=1e-12, atol=1e-10)
    exact = np.linalg.eigvalsh(H)
    top = top_eigenvalues(f, params, k=2, which="LA", tol=1e-12)
    np.testing.assert_allclose(top, exact[::-1][:2], rtol=1e-8)
    bottom, vecs = top_eigenvalues(f, params, k=1, which="SA", tol=1e-12, return_eigenvectors=True)
    np.testing.assert_allclose(bottom, exact[:1], rtol=1e-8)
    both = top_eigenvalues(f, params, k=2, which="BE", tol=1e-12)
    np.testing.assert_allclose(both, [exact[-1], exact[0]], rtol=1e-8)
    assert rayleigh_quotient(f, params, vecs[0]) == pytest.approx(float(bottom[0]), rel=1e-8)
    v = _rand_like(params, 9)
    x = flatten(v).numpy()
    assert rayleigh_quotient(f, params, v) == pytest.approx(x @ H @ x / (x @ x), rel=1e-10)


def test_top_eigenvalue_on_transformer_is_reproducible_and_bounds_rayleigh_quotients():
    problem = make_problem(seed=1, batch_size=3, seq_len=8)
    f = _joint(problem)
    params = problem.params
    lam1 = top_eigenvalues(f, params, k=1, tol=1e-8)
    lam2 = top_eigenvalues(f, params, k=1, tol=1e-8)
    assert np.array_equal(lam1, lam2)
    for seed in range(3):
        assert rayleigh_quotient(f, params, _rand_like(params, seed)) <= lam1[0] * (1 + 1e-6)


def test_jvp_logprobs_matches_finite_differences():
    problem = make_problem(seed=2)
    obj = objectives(problem.model, problem.batch, CrossEntropy())
    params = problem.params
    v = _rand_like(params, 6)
    tangent = jvp_logprobs(obj.logprob_fn, params, v)
    eps = 1e-6
    fd = (
        obj.logprob_fn({k: params[k] + eps * v[k] for k in params})
        - obj.logprob_fn({k: params[k] - eps * v[k] for k in params})
    ) / (2 * eps)
    assert tangent.shape == problem.batch.mask.shape
    assert float((tangent - fd).abs().max()) <= 1e-6 * float(fd.abs().max())
    value, same = jvp_logprobs(obj.logprob_fn, params, v, with_value=True)  # ℓ(θ) from the same pass
    assert torch.equal(same, tangent)
    assert torch.allclose(value, obj.logprob_fn(params), rtol=1e-13, atol=1e-14) and not value.requires_grad


def test_batched_jvp_logprobs_equal_one_pass_per_direction():
    """float64: ℓ(θ) and every directional derivative from the pass carrying all tangents equal
    the single-tangent passes (themselves checked against finite differences above)."""
    problem = make_problem(seed=3)
    obj = objectives(problem.model, problem.batch, CrossEntropy())
    params = problem.params
    directions = [_rand_like(params, seed) for seed in (7, 8, 9)]
    value, products = jvp_logprobs_batched(obj.logprob_fn, params, directions)
    assert len(products) == 3 and not value.requires_grad
    for v, product in zip(directions, products, strict=True):
        single_value, single = jvp_logprobs(obj.logprob_fn, params, v, with_value=True)
        assert torch.allclose(product, single, rtol=1e-12, atol=1e-15)
        assert torch.allclose(value, single_value, rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="directions is empty"):
        jvp_logprobs_batched(obj.logprob_fn, params, [])
    with pytest.raises(ValueError, match=r"directions\[1\]"):
        jvp_logprobs_batched(obj.logprob_fn, params, [directions[0], {"nope": torch.ones(1)}])


def test_flatten_roundtrip():
    _, params, _ = _quartic()
    back = unflatten(flatten(params), params)
    assert all(torch.equal(back[k], params[k]) for k in params)


def test_eigenvalues_of_a_zero_hessian_are_zero():
    params = {"x": torch.ones(4, dtype=torch.float64)}
    vals = top_eigenvalues(lambda p: p["x"].sum() * 0.0, params, k=2, which="BE")
    assert np.array_equal(vals, np.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dot_has_exact_products_accumulated_in_float64(dtype):
    """Against NumPy float64 on the same values, for large tensors (blocked), small ones (in
    concatenated runs) and both."""
    gen = torch.Generator().manual_seed(0)
    big = {"big": torch.randn(DOT_BLOCK * 2 + 17, generator=gen).to(dtype)}
    big_b = {"big": (torch.randn(DOT_BLOCK * 2 + 17, generator=gen) + 0.5).to(dtype)}

    def exact(a, b):
        return sum(float(np.dot(a[k].double().numpy().ravel(), b[k].double().numpy().ravel())) for k in a)

    assert dot(big, big_b) == pytest.approx(exact(big, big_b), rel=1e-12, abs=1e-9)
    small = {"matrix": torch.randn(33, 7, generator=gen).to(dtype), "scalar": torch.tensor(1.5).to(dtype)}
    small_b = {"matrix": torch.randn(33, 7, generator=gen).to(dtype), "scalar": torch.tensor(-2.0).to(dtype)}
    assert dot(small, small_b) == pytest.approx(exact(small, small_b), rel=1e-12, abs=1e-12)
    both, both_b = {**big, **small}, {**big_b, **small_b}
    assert dot(both, both_b) == pytest.approx(exact(both, both_b), rel=1e-12, abs=1e-9)
    # cancellation across tensors: exact
    assert dot({"p": big["big"], "m": -big["big"]}, {"p": big["big"], "m": big["big"]}) == pytest.approx(0.0, abs=1e-9)


def test_dots_convert_shared_operands_once_and_match_each_dot():
    """Several pairs sharing operands, over many small tensors in more than one concatenated run
    (more than DOT_BLOCK elements under DOT_SMALL each), large ones and a float64 tensor: every
    product equals NumPy's float64 dot of that pair alone."""
    gen = torch.Generator().manual_seed(1)
    shapes = {f"small{i}": (DOT_SMALL - 1 - i,) for i in range(2 * DOT_BLOCK // DOT_SMALL + 3)}
    shapes |= {"large": (DOT_BLOCK + 5,), "matrix": (300, 300), "scalar": ()}

    def vector(scale):
        return {k: (scale * torch.randn(shape, generator=gen)).float() for k, shape in shapes.items()}

    g, delta, delta1 = vector(1.0), vector(1e-3), vector(10.0)
    delta["matrix"] = delta["matrix"].double()

    def exact(a, b):
        return sum(float(np.dot(a[k].double().numpy().ravel(), b[k].double().numpy().ravel())) for k in a)

    pairs = [(g, delta1), (g, delta), (delta, delta), (delta1, g), (g, g)]
    got = dots(pairs)
    assert got == pytest.approx([exact(a, b) for a, b in pairs], rel=1e-12)
    assert got[0] == got[3]  # the same products in the same order
    assert dots([]) == []


def _rel(a, b) -> float:
    return float((flatten(a) - flatten(b)).norm() / flatten(b).norm())


@pytest.mark.parametrize("method", METHODS)
def test_batched_hvps_equal_sequential_ones_and_finite_differences(method):
    """SecondOrder.hvps in one batched pass == one pass per tangent (float64, 1e-12 relative), ==
    the standalone hvp, and both match central finite differences of the gradient; the graph
    stays usable afterwards."""
    problem = make_problem(seed=1)
    f, params = _joint(problem), problem.params
    vs = [_rand_like(params, 10 + i) for i in range(3)]
    so = second_order(f, params, method=method)
    batched, sequential = so.hvps(vs, batched=True), so.hvps(vs, batched=False)
    assert len(batched) == len(sequential) == 3
    eps = 1e-5
    for v, hb, hs in zip(vs, batched, sequential, strict=True):
        assert set(hb) == set(params) and all(hb[k].shape == params[k].shape for k in params)
        assert _rel(hb, hs) <= 1e-12
        assert _rel(hb, hvp(f, params, v, method=method)) <= 1e-12
        gp = torch.func.grad(f)({k: params[k] + eps * v[k] for k in params})
        gm = torch.func.grad(f)({k: params[k] - eps * v[k] for k in params})
        fd = {k: (gp[k] - gm[k]) / (2 * eps) for k in params}
        assert _rel(hb, fd) <= 1e-6
    assert _rel(so.hvp(vs[0]), sequential[0]) <= 1e-12  # the graph survives a batched pass
    assert so.hvps([]) == [] and _rel(so.hvps([vs[1]], batched=True)[0], sequential[1]) <= 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_batched_hvps_match_the_analytic_hessian_and_give_zeros_for_unused_parameters(method):
    f, params, H = _quartic()
    vs = [_rand_like(params, 20 + i) for i in range(2)]
    for hv, v in zip(second_order(f, params, method=method).hvps(vs, batched=True), vs, strict=True):
        expected = H @ flatten(v).numpy()
        np.testing.assert_allclose(flatten(hv).numpy(), expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
    params = {"x": torch.tensor([1.0, 2.0], dtype=torch.float64), "unused": torch.ones(3, dtype=torch.float64)}
    vs = [{"x": torch.tensor([1.0, 0.0], dtype=torch.float64), "unused": torch.ones(3, dtype=torch.float64)},
          {"x": torch.tensor([0.0, 1.0], dtype=torch.float64), "unused": torch.ones(3, dtype=torch.float64)}]
    out = second_order(lambda p: (p["x"] ** 3).sum(), params, method=method).hvps(vs, batched=True)
    assert torch.equal(out[0]["unused"], torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(out[0]["x"], torch.tensor([6.0, 0.0], dtype=torch.float64))
    assert torch.allclose(out[1]["x"], torch.tensor([0.0, 12.0], dtype=torch.float64))


def test_hvps_default_follows_the_measured_rule_or_the_callers_choice(monkeypatch):
    problem = make_problem()
    f, params = _joint(problem), problem.params
    vs = [_rand_like(params, 30 + i) for i in range(2)]
    assert batched_by_default("forward", params) and not batched_by_default("autograd", params)
    assert not batched_by_default("reverse", params)
    for method, batched, expected in (("autograd", None, False), ("forward", None, True),
                                      ("forward", False, False), ("autograd", True, True)):
        so = second_order(f, params, method=method, batched=batched)
        calls = []
        so.batched_hvps = lambda xs, so=so, calls=calls: calls.append(len(xs)) or [so.hvp(x) for x in xs]
        so.hvps(vs)
        assert (calls == [2]) is expected, (method, batched)
        calls.clear()
        so.hvps(vs, batched=not expected)  # a call's own choice wins
        assert (calls == [2]) is (not expected)
    with pytest.raises(TypeError, match="batched must be True, False or None"):
        second_order(f, params, batched="yes")
    with pytest.raises(ValueError):
        second_order(f, params).hvps([vs[0], {"x": torch.zeros(2)}], batched=True)
