"""decompose() against closed forms, Taylor's theorem and the no-side-effect contract."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import make_problem

from decomp import optim as cf
from decomp.decomposition import decompose, measure_step
from decomp.models.tiny import MTPTransformer
from decomp.objectives import objectives
from decomp.occ import model_efficiency as efficiency
from decomp.occ import model_gain as gain
from decomp.regimes import CrossEntropy, Detach, Policy
from decomp.sweep import decompose_sweep

REL = 1e-10


def _quadratic(seed: int = 0, concave: bool = True):
    """J(x) = bᵀx − ½xᵀAx (A ≻ 0 when concave), L(x) = ½xᵀBx − cᵀx over x = [vec(M); a]."""
    rng = np.random.default_rng(seed)
    n = 7
    R = rng.standard_normal((n, n))
    A = R @ R.T / n + 0.5 * np.eye(n)
    if not concave:
        A = -A
    S = rng.standard_normal((n, n))
    B = S @ S.T / n + 0.1 * np.eye(n)
    b, c, x = rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal(n)
    At, Bt, bt, ct = (torch.tensor(v) for v in (A, B, b, c))

    def flat(p):
        return torch.cat([p["M"].reshape(-1), p["a"]])

    J = lambda p: bt @ flat(p) - 0.5 * flat(p) @ At @ flat(p)  # noqa: E731
    L = lambda p: 0.5 * flat(p) @ Bt @ flat(p) - ct @ flat(p)  # noqa: E731
    params = {"M": torch.tensor(x[:4]).reshape(2, 2), "a": torch.tensor(x[4:])}
    Jn = lambda z: b @ z - 0.5 * z @ A @ z  # noqa: E731
    return J, L, params, dict(A=A, B=B, b=b, c=c, x=x, J=Jn)


def _close(a: float, b: float, rel: float = REL) -> bool:
    return abs(a - b) <= rel * max(abs(b), 1e-300)


def test_sgd_on_quadratic_matches_closed_forms():
    J, L, params, q = _quadratic()
    lr, coef = 0.1, 0.7
    d = decompose(J, L, params, lr=lr, coef=coef)
    A, B, b, c, x = q["A"], q["B"], q["b"], q["c"], q["x"]
    g = b - A @ x
    gl = B @ x - c
    u_rl = lr * g
    delta1 = -lr * gl
    delta = coef * delta1
    H = -A
    C, X, P = g @ delta, u_rl @ H @ delta, -0.5 * delta @ H @ delta
    C1, X1, P1 = g @ delta1, u_rl @ H @ delta1, -0.5 * delta1 @ H @ delta1
    expected = dict(
        correlation=C, cross=X, penalty=P, predicted=C + X - P,
        realized=q["J"](x + u_rl + delta) - q["J"](x + u_rl),
        lambda_star=(C1 + X1) / (2 * P1), lambda_star_no_cross=C1 / (2 * P1),
        correlation_unit=C1, cross_unit=X1, penalty_unit=P1,
        grad_norm_rl=np.linalg.norm(g), grad_norm_mtp=np.linalg.norm(gl),
        cosine=-(g @ gl) / (np.linalg.norm(g) * np.linalg.norm(gl)),
        update_norm_rl=np.linalg.norm(u_rl), displacement_norm=np.linalg.norm(delta),
        rl_objective=q["J"](x), realized_rl=q["J"](x + u_rl) - q["J"](x),
    )
    got = d.to_dict()
    for key, value in expected.items():
        assert _close(got[key], float(value)), (key, got[key], value)
    # on a quadratic J the second-order model is exact
    assert _close(d.realized, d.predicted)
    assert abs(d.residual) <= REL * abs(d.realized)
    assert d.lambda_star_reason == ""
    assert d.optimizer == "sgd" and d.coef == coef


def test_quadratic_gain_is_the_realized_change_and_lambda_star_maximises_it():
    J, L, params, q = _quadratic(seed=1)
    lr = 0.05
    base = decompose(J, L, params, lr=lr, coef=1.0)
    for lam in (-2.0, -0.3, 0.4, base.lambda_star, 3.0):
        d = decompose(J, L, params, lr=lr, coef=lam)
        assert _close(d.realized, gain(lam, base), rel=1e-9)
    best = decompose(J, L, params, lr=lr, coef=base.lambda_star).realized
    for lam in np.linspace(base.lambda_star - 1, base.lambda_star + 1, 9):
        assert decompose(J, L, params, lr=lr, coef=float(lam)).realized <= best + 1e-15
    assert efficiency(base.lambda_star, base) == pytest.approx(1.0, rel=1e-12)
    assert efficiency(0.0, base) == 0.0
    assert efficiency(2 * base.lambda_star, base) == pytest.approx(0.0, abs=1e-12)


def _numpy_adamw(x, grad, m, v, step, lr, b1, b2, eps, wd):
    t = step + 1
    m2 = b1 * m + (1 - b1) * grad
    v2 = b2 * v + (1 - b2) * grad**2
    mhat, vhat = m2 / (1 - b1**t), v2 / (1 - b2**t)
    return -lr * wd * x - lr * mhat / (np.sqrt(vhat) + eps), np.sqrt(vhat) + eps


def test_adamw_on_quadratic_matches_numpy_and_taylor_is_exact():
    J, L, params, q = _quadratic(seed=2)
    rng = np.random.default_rng(5)
    n = 7
    m, v = 0.1 * rng.standard_normal(n), 0.05 * rng.random(n)
    step, lr, coef, wd = 3, 0.02, 0.4, 0.1
    split = lambda z: {"M": torch.tensor(z[:4]).reshape(2, 2), "a": torch.tensor(z[4:])}  # noqa: E731
    state = {k: {"step": torch.tensor(float(step)), "exp_avg": split(m)[k], "exp_avg_sq": split(v)[k]} for k in params}
    opt = cf.AdamW(cf.AdamHyper(lr=lr, weight_decay=wd), state)
    d = decompose(J, L, params, coef=coef, optimizer=opt)
    A, B, b, c, x = q["A"], q["B"], q["b"], q["c"], q["x"]
    g, gl = b - A @ x, B @ x - c
    u_rl, denom = _numpy_adamw(x, -g, m, v, step, lr, 0.9, 0.999, 1e-8, wd)
    u_full, _ = _numpy_adamw(x, -g + coef * gl, m, v, step, lr, 0.9, 0.999, 1e-8, wd)
    delta = u_full - u_rl
    # δ₁ = dδ/dλ: the first moment's path and the second moment's (closed form in NumPy)
    t, G = step + 1, -g
    m2 = 0.9 * m + 0.1 * G
    root = np.sqrt((0.999 * v + 0.001 * G**2) / (1 - 0.999**t))
    d_root = 0.001 * G * gl / ((1 - 0.999**t) * root)
    delta1 = -lr / (1 - 0.9**t) * (0.1 * gl / denom - m2 * d_root / denom**2)
    h = 1e-5  # and a central difference of the real step agrees
    fd = (_numpy_adamw(x, -g + h * gl, m, v, step, lr, 0.9, 0.999, 1e-8, wd)[0]
          - _numpy_adamw(x, -g - h * gl, m, v, step, lr, 0.9, 0.999, 1e-8, wd)[0]) / (2 * h)
    assert np.allclose(fd, delta1, rtol=1e-6, atol=1e-12)
    H = -A
    expected = dict(
        correlation=g @ delta, cross=u_rl @ H @ delta, penalty=-0.5 * delta @ H @ delta,
        correlation_unit=g @ delta1, cross_unit=u_rl @ H @ delta1, penalty_unit=-0.5 * delta1 @ H @ delta1,
    )
    got = d.to_dict()
    for key, value in expected.items():
        assert _close(got[key], float(value), rel=1e-9), (key, got[key], value)
    assert d.optimizer == "adamw"
    assert _close(d.realized, d.predicted, rel=1e-9)


def test_lambda_star_is_nan_with_reason_when_J_is_convex_along_the_displacement():
    J, L, params, _ = _quadratic(seed=3, concave=False)
    d = decompose(J, L, params, lr=0.1, coef=1.0)
    assert d.penalty_unit < 0
    assert math.isnan(d.lambda_star) and math.isnan(d.lambda_star_no_cross)
    assert "penalty_unit <= 0" in d.lambda_star_reason
    assert math.isnan(efficiency(0.5, d))


@pytest.mark.parametrize("regime", [CrossEntropy(), Policy()], ids=["ce", "policy"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("seed", [0, 1])
def test_residual_is_third_order_in_the_step_size(regime, optimizer, seed):
    problem = make_problem(seed=seed)
    obj = objectives(problem.model, problem.batch, regime)
    params = problem.params
    if optimizer == "sgd":
        lrs, opt = (1e-3, 5e-4), "sgd"
    else:
        lrs = (2e-3, 1e-3)
        state = {
            k: {"step": torch.tensor(10.0), "exp_avg": 0.01 * torch.randn_like(p), "exp_avg_sq": torch.full_like(p, 1e-2)}
            for k, p in params.items()
        }
        opt = cf.AdamW(cf.AdamHyper(lr=1.0), state)
    r1, r2 = (decompose(obj.rl_objective, obj.mtp_loss, params, lr=lr, coef=1.0, optimizer=opt).residual for lr in lrs)
    assert 8 * 0.75 <= r1 / r2 <= 8 * 1.25, (r1, r2)


def test_detach_gives_exactly_zero_shared_displacement_and_terms():
    problem = make_problem(seed=4)
    obj = objectives(problem.model, problem.batch, Detach())
    params = problem.params
    model = problem.model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = -obj.rl_objective(dict(model.named_parameters())) + obj.mtp_loss(dict(model.named_parameters()))
    loss.backward()
    opt.step()
    counterfactual = cf.from_torch(opt, dict(model.named_parameters()))
    g = torch.func.grad(obj.rl_objective)(params)
    gl = torch.func.grad(obj.mtp_loss)(params)
    out = counterfactual.counterfactual(params, {k: -v for k, v in g.items()}, gl, 0.5)
    shared = model.shared_parameter_names()
    assert shared and len(shared) < len(params)
    for name in shared:
        assert torch.equal(out.displacement[name], torch.zeros_like(params[name])), name
        assert torch.equal(out.unit_displacement[name], torch.zeros_like(params[name])), name
    assert any(float(out.displacement[n].abs().max()) > 0 for n in params if n.startswith("mtp."))
    for optimizer in ("sgd", opt):
        d = decompose(obj.rl_objective, obj.mtp_loss, dict(model.named_parameters()), lr=1e-2, coef=0.5, optimizer=optimizer)
        assert d.correlation == 0.0 and d.penalty == 0.0 and d.cross == 0.0
        assert d.correlation_unit == 0.0 and d.penalty_unit == 0.0
        assert d.realized == 0.0
        assert math.isnan(d.lambda_star) and "does not move J" in d.lambda_star_reason


def test_instrumenting_leaves_params_optimizer_state_and_rng_bit_identical():
    problem = make_problem(dtype=torch.float32, seed=5)
    model = problem.model
    obj = objectives(model, problem.batch, Policy())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    named = dict(model.named_parameters())
    for _ in range(3):
        opt.zero_grad()
        (-obj.rl_objective(named) + 0.1 * obj.mtp_loss(named)).backward()
        opt.step()
    opt.zero_grad()
    (-obj.rl_objective(named) + 0.1 * obj.mtp_loss(named)).backward()  # a pending .grad
    params_before = {k: p.detach().clone() for k, p in model.named_parameters()}
    grads_before = {k: p.grad.clone() for k, p in model.named_parameters()}
    state_before = copy.deepcopy(opt.state_dict())
    rng_before = torch.get_rng_state()

    def noisy_objective(p):  # draws random numbers: the RNG must still come back unchanged
        return obj.rl_objective(p) + 0.0 * torch.rand(())

    d = decompose(noisy_objective, obj.mtp_loss, dict(model.named_parameters()), coef=0.1, optimizer=opt)
    assert math.isfinite(d.penalty)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), params_before[k])
        assert torch.equal(p.grad, grads_before[k])
    state_after = opt.state_dict()
    assert state_after["param_groups"] == state_before["param_groups"]
    for pid, st in state_before["state"].items():
        for key, value in st.items():
            assert torch.equal(value, state_after["state"][pid][key]), (pid, key)


def test_forward_and_reverse_hvp_methods_give_the_same_decomposition():
    problem = make_problem(seed=6)
    obj = objectives(problem.model, problem.batch, CrossEntropy())
    a = decompose(obj.rl_objective, obj.mtp_loss, problem.params, lr=1e-2, coef=0.3, hvp_method="reverse")
    b = decompose(obj.rl_objective, obj.mtp_loss, problem.params, lr=1e-2, coef=0.3, hvp_method="forward")
    c = decompose(obj.rl_objective, obj.mtp_loss, problem.params, lr=1e-2, coef=0.3, hvp_method="autograd")
    for key in ("correlation", "cross", "penalty", "realized", "penalty_unit"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-10, abs=1e-16)
        assert getattr(a, key) == pytest.approx(getattr(c, key), rel=1e-10, abs=1e-16)


def test_float32_model_with_sdpa_and_live_optimizer():
    problem = make_problem(dtype=torch.float32, seed=7)
    assert isinstance(problem.model, MTPTransformer)
    obj = objectives(problem.model, problem.batch, CrossEntropy())
    opt = torch.optim.SGD(problem.model.parameters(), lr=0.05, momentum=0.9)
    d = decompose(obj.rl_objective, obj.mtp_loss, dict(problem.model.named_parameters()), coef=0.2, optimizer=opt)
    assert d.optimizer == "sgd"
    assert d.correlation == pytest.approx(0.2 * d.correlation_unit, rel=1e-6)
    # every float is finite but the search's (not run) and the sampling errors' (no groups given)
    unmeasured = {"noise_groups", *(k for k in d.to_dict() if k.endswith("_se"))}
    assert all(math.isfinite(v) for k, v in d.to_dict().items()
               if isinstance(v, float) and "lambda" not in k and "gain" not in k and k not in unmeasured)


def test_measure_step_returns_the_updates_the_decomposition_used():
    J, L, params, q = _quadratic(seed=4)
    m = measure_step(J, L, params, lr=0.1, coef=0.5)
    g = q["b"] - q["A"] @ q["x"]
    flat = lambda d: np.concatenate([d["M"].reshape(-1).numpy(), d["a"].numpy()])  # noqa: E731
    np.testing.assert_allclose(flat(m.grad_rl), g, rtol=1e-12)
    np.testing.assert_allclose(flat(m.updates.update_rl), 0.1 * g, rtol=1e-12)
    np.testing.assert_allclose(flat(m.updates.displacement), 0.5 * flat(m.updates.unit_displacement), rtol=1e-15)
    assert m.decomposition.correlation == pytest.approx(float(g @ flat(m.updates.displacement)), rel=1e-12)
    assert m.decomposition == decompose(J, L, params, lr=0.1, coef=0.5)


def test_sweep_on_quadratic_with_sgd_is_exactly_the_parabola():
    J, L, params, _ = _quadratic(seed=5)
    coefs = [-3.0, -1.0, 0.0, 0.5, 2.0, 7.0]
    sweep = decompose_sweep(J, L, params, lr=0.1, coef=1.0, coefs=coefs)
    assert sweep.coefs == coefs and sweep.realized[2] == 0.0
    for r, q in zip(sweep.realized, sweep.quadratic, strict=True):
        assert r == pytest.approx(q, rel=1e-9, abs=1e-15)
    for lam, r in zip(coefs, sweep.realized, strict=True):
        assert r == pytest.approx(decompose(J, L, params, lr=0.1, coef=lam).realized, rel=1e-12, abs=1e-15)


def test_sweep_with_adamw_uses_real_nonlinear_steps():
    problem = make_problem(seed=8)
    obj = objectives(problem.model, problem.batch, Policy())
    params = problem.params
    state = {k: {"step": torch.tensor(3.0), "exp_avg": 0.01 * torch.randn_like(p), "exp_avg_sq": 1e-4 * torch.rand_like(p)}
             for k, p in params.items()}
    opt = cf.AdamW(cf.AdamHyper(lr=1e-3), state)
    sweep = decompose_sweep(obj.rl_objective, obj.mtp_loss, params, coef=0.5, coefs=[0.5, 5.0], optimizer=opt)
    direct = decompose(obj.rl_objective, obj.mtp_loss, params, coef=0.5, optimizer=opt)
    assert sweep.realized[0] == pytest.approx(direct.realized, rel=1e-12)
    # Adam normalises: a 10× coefficient does not give a 10× displacement, so the realized
    # effect leaves the parabola of the frozen-preconditioner model
    assert sweep.realized[1] != pytest.approx(sweep.quadratic[1], rel=1e-3)


def test_a_measurement_without_buffers_keeps_its_gain_function():
    """``without_buffers`` drops ∇J and the gain's evaluation buffer; the gain function still
    gives the same realized changes (its buffer allocated again), bit for bit."""
    problem = make_problem(seed=8)
    obj = objectives(problem.model, problem.batch, Policy())
    m = measure_step(obj.rl_objective, obj.mtp_loss, problem.params, coef=0.5, lr=1e-3, optimizer="adamw")
    before = [m.gain(c) for c in (0.5, 2.0)]
    light = m.without_buffers()
    assert light.grad_rl is None and m.grad_rl is not None and light.gain._work is None
    assert [light.gain(c) for c in (0.5, 2.0)] == before
    assert light.decomposition == m.decomposition


def test_rl_loss_drives_the_update_while_J_is_measured():
    J, L, params, q = _quadratic(seed=6)
    rl_loss = lambda p: -2.0 * J(p)  # noqa: E731  (a rescaled training loss)
    m = measure_step(J, L, params, lr=0.1, coef=0.5, rl_loss=rl_loss)
    base = measure_step(J, L, params, lr=0.1, coef=0.5)
    for k in params:
        assert torch.allclose(m.updates.update_rl[k], 2.0 * base.updates.update_rl[k], rtol=1e-13)
        assert torch.allclose(m.grad_rl[k], base.grad_rl[k])  # g is still ∇J
    assert m.decomposition.correlation == pytest.approx(base.decomposition.correlation, rel=1e-12)
    assert m.decomposition.cross == pytest.approx(2.0 * base.decomposition.cross, rel=1e-12)
    assert m.decomposition.realized == pytest.approx(m.decomposition.predicted, rel=1e-9)


def test_first_order_losses_from_one_forward_give_the_same_step():
    """One forward for ∇L_MTP and ∇rl_loss gives the step of two separate passes (float64)."""
    problem = make_problem(seed=12)
    obj = objectives(problem.model, problem.batch, Policy(), coef=0.3, clip=(0.2, 0.2))
    opt = torch.optim.AdamW(problem.model.parameters(), lr=1e-3)
    named = dict(problem.model.named_parameters())
    shared = measure_step(obj.rl_objective, obj.mtp_loss, named, coef=0.3, optimizer=opt, rl_loss=obj.rl_loss,
                          first_order=obj.first_order)
    apart = measure_step(obj.rl_objective, obj.mtp_loss, named, coef=0.3, optimizer=opt, rl_loss=obj.rl_loss)
    for k in named:
        assert torch.allclose(shared.grad_mtp[k], apart.grad_mtp[k], rtol=1e-12, atol=1e-15)
        assert torch.allclose(shared.update_grad[k], apart.update_grad[k], rtol=1e-12, atol=1e-15)
    for key in ("correlation", "cross", "penalty", "realized", "lambda_star"):
        assert getattr(shared.decomposition, key) == pytest.approx(getattr(apart.decomposition, key), rel=1e-10,
                                                                   nan_ok=True)
    assert math.isfinite(shared.decomposition.correlation) and shared.decomposition.correlation != 0


def test_main_head_on_response_positions_only_gives_the_same_log_probs():
    from decomp.objectives import RolloutBatch, model_logprobs

    problem = make_problem(seed=13, prompt_len=5)
    b = problem.batch
    batch = RolloutBatch(b.tokens, b.mask, b.advantages, b.old_logp, response_start=4)
    obj = objectives(problem.model, batch, Policy())
    full, _, _ = model_logprobs(problem.model, problem.params, batch.tokens, with_mtp=False)
    part = obj.logprob_fn(problem.params)
    assert torch.allclose(part[:, 4:], full[:, 4:], rtol=1e-12) and bool((part[:, :4] == 0).all())
    assert float(obj.rl_objective(problem.params)) == pytest.approx(
        float((b.advantages * torch.exp(full - b.old_logp) * b.mask).sum() / b.mask.sum()), rel=1e-12)


def test_realized_changes_are_resolved_below_float32_resolution_of_J():
    """At a tiny step, evaluating the two points of a float32 model in float64 recovers the
    float64 model's realized change; the float32 evaluation (even token by token) does not."""
    import copy as copy_

    from decomp.realized import RealizedGain
    from decomp.updates import step_updates

    p64 = make_problem(seed=14)
    model32 = copy_.deepcopy(p64.model).float()
    b = p64.batch
    results = {}
    for name, model, dtype in (("64", p64.model, torch.float64), ("32", model32, torch.float32)):
        from decomp.objectives import RolloutBatch

        batch = RolloutBatch(b.tokens, b.mask, b.advantages.to(dtype), b.old_logp.to(dtype))
        obj = objectives(model, batch, Policy(), coef=0.5, clip=(0.2, 0.2))
        params = {k: v.detach() for k, v in model.named_parameters()}
        step = step_updates(obj.rl_objective, obj.mtp_loss, params, coef=0.5, lr=3e-6, rl_loss=obj.rl_loss)
        gain = RealizedGain(obj.rl_objective, step)
        wide = RealizedGain(obj.rl_objective, step, dtype=torch.float64)
        results[name] = (gain(0.5), wide(0.5))
    truth = results["64"][0]
    assert results["64"][1] == pytest.approx(truth, rel=1e-12)
    assert results["32"][1] == pytest.approx(truth, rel=1e-3)  # float32 model, float64 evaluation: resolved
    assert abs(results["32"][0] - truth) > 20 * abs(results["32"][1] - truth)  # float32 evaluation: not


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_microbatched_J_side_gives_the_whole_batch_decomposition(optimizer):
    """J's gradient and both HVPs summed over row chunks (one chunk's graph at a time) give the
    whole-batch decomposition to float64 rounding, for chunk counts up to one row per chunk and
    beyond (empty chunks), with a held-out objective and with a row without response tokens."""
    from decomp.decomposition import decompose_updates
    from decomp.updates import step_updates

    problem = make_problem(seed=21, batch_size=6)
    b = problem.batch
    mask = b.mask.clone()
    mask[2] = False  # a row whose share of J is 0: left out of the split
    from decomp.objectives import RolloutBatch

    held = RolloutBatch(b.tokens, mask, b.advantages * mask, b.old_logp)
    obj = objectives(problem.model, b, Policy(), coef=0.4, clip=(0.2, 0.2))
    named = dict(problem.model.named_parameters())
    opt = torch.optim.AdamW(problem.model.parameters(), lr=1e-3) if optimizer == "adamw" else "sgd"
    step = step_updates(obj.rl_objective, obj.mtp_loss, named, coef=0.4, optimizer=opt, lr=None if
                        optimizer == "adamw" else 1e-3, rl_loss=obj.rl_loss)
    for objective in (obj.rl_objective, objectives(problem.model, held, Policy()).rl_objective):
        whole = decompose_updates(step, objective).decomposition
        assert whole.penalty_unit != 0 and whole.correlation != 0
        for parts in (2, 3, 6, 9):
            split = decompose_updates(step, objective, microbatches=parts).decomposition
            for key in ("correlation", "cross", "penalty", "correlation_unit", "cross_unit", "penalty_unit",
                        "grad_norm_rl", "rl_objective", "cosine", "lambda_star", "realized", "realized_rl"):
                assert getattr(split, key) == pytest.approx(getattr(whole, key), rel=1e-11, abs=1e-15,
                                                            nan_ok=True), (parts, key)


def test_microbatches_refuse_what_they_cannot_split():
    from decomp.decomposition import decompose_updates
    from decomp.evaluation import EvaluationSide
    from decomp.updates import step_updates

    problem = make_problem(seed=22)
    obj = objectives(problem.model, problem.batch, Policy(), coef=0.4, clip=(0.2, 0.2))
    named = dict(problem.model.named_parameters())
    step = step_updates(obj.rl_objective, obj.mtp_loss, named, coef=0.4, lr=1e-3, rl_loss=obj.rl_loss)
    with pytest.raises(ValueError, match="split"):
        decompose_updates(step, lambda p: obj.rl_objective(p), microbatches=2)
    with pytest.raises(ValueError, match="shared side"):
        side = EvaluationSide.at(obj.rl_objective, step.theta, [])
        decompose_updates(step, obj.rl_objective, side=side, microbatches=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="microbatches"):
            decompose_updates(step, obj.rl_objective, microbatches=bad)
    deferred = step_updates(obj.rl_objective, obj.mtp_loss, named, coef=0.4, lr=1e-3, defer=True)
    with pytest.raises(ValueError, match="updates before"):
        decompose_updates(deferred, obj.rl_objective, microbatches=2)


def test_an_objective_split_by_rows_sums_to_the_objective():
    """``split``: the parts' values and gradients sum to J's (float64); an empty row is left out."""
    problem = make_problem(seed=23, batch_size=5)
    obj = objectives(problem.model, problem.batch, Policy())
    params = {k: v.detach() for k, v in problem.model.named_parameters()}
    parts = obj.rl_objective.split(3)
    assert len(parts) == 3
    assert float(sum(p(params) for p in parts)) == pytest.approx(float(obj.rl_objective(params)), rel=1e-13)
    whole = torch.func.grad(obj.rl_objective)(params)
    summed = [torch.func.grad(p)(params) for p in parts]
    for k in params:
        assert torch.allclose(sum(g[k] for g in summed), whole[k], rtol=1e-11, atol=1e-14)
    assert len(obj.rl_objective.split(7)) == 5  # more parts than rows: one row each
    with pytest.raises(ValueError, match="parts"):
        obj.rl_objective.split(0)


def test_the_cosine_is_taken_over_the_shared_parameters_when_given():
    """The MTP module's own parameters have ∇J = 0 but ∇L_MTP ≠ 0: over every parameter they only
    shrink the cosine; over the shared ones it is the cosine the `cosine` regime gates on."""
    problem = make_problem(seed=3)
    model = problem.model
    obj = objectives(model, problem.batch, CrossEntropy())
    params = dict(model.named_parameters())
    shared = model.shared_parameter_names()
    d_all = measure_step(obj.rl_objective, obj.mtp_loss, params, lr=1e-2, coef=0.1)
    m = measure_step(obj.rl_objective, obj.mtp_loss, params, lr=1e-2, coef=0.1, shared=shared)
    g = np.concatenate([m.grad_rl[k].reshape(-1).numpy() for k in shared])
    h = np.concatenate([m.grad_mtp[k].reshape(-1).numpy() for k in shared])
    expected = float(-g @ h / (np.linalg.norm(g) * np.linalg.norm(h)))
    assert m.decomposition.cosine == pytest.approx(expected, rel=1e-10)
    assert abs(d_all.decomposition.cosine) < abs(m.decomposition.cosine)  # diluted over every parameter
    assert m.decomposition.correlation == d_all.decomposition.correlation  # nothing else changes
    with pytest.raises(ValueError, match="shared names parameters"):
        measure_step(obj.rl_objective, obj.mtp_loss, params, lr=1e-2, coef=0.1, shared=["nope"])
