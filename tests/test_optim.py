"""Counterfactual optimizer steps against torch.optim (float32, after several real steps)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_problem

from decomp import optim as cf
from decomp.curvature import bounded_runs
from decomp.objectives import objectives
from decomp.regimes import CrossEntropy


def _grads(model, seed):
    """Real gradients of a real loss (J − L_MTP on a random batch) written into .grad."""
    problem = make_problem(dtype=torch.float32, seed=seed)
    obj = objectives(problem.model, problem.batch, CrossEntropy())
    params = dict(model.named_parameters())
    loss = -obj.rl_objective(params) + 0.5 * obj.mtp_loss(params)
    model.zero_grad()
    loss.backward()
    return {k: p.grad.detach().clone() for k, p in params.items()}


def _check_step(opt, model, build, steps=5):
    for s in range(steps):
        _grads(model, s)
        opt.step()
    grads = _grads(model, 99)
    named = {k: p for k, p in model.named_parameters()}
    counterfactual = build(opt, named)
    before = {k: p.detach().clone() for k, p in named.items()}
    u = counterfactual.update({k: p.detach() for k, p in named.items()}, grads)
    opt.step()
    for k, p in named.items():
        ours = before[k] + u[k]
        scale = p.detach().abs().max().clamp_min(1e-12)
        err = float((ours - p.detach()).abs().max() / scale)
        assert err <= 1e-6, (k, err)


def _model():
    return make_problem(dtype=torch.float32, seed=0).model


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.1),
        dict(lr=0.05, momentum=0.9),
        dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
    ],
)
@pytest.mark.parametrize("steps", [0, 3])
def test_sgd_reproduces_torch(kwargs, steps):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), **kwargs)
    _check_step(opt, model, cf.from_torch, steps=steps)


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
        (torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, amsgrad=True)),
        (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01)),
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, foreach=False)),
    ],
)
@pytest.mark.parametrize("steps", [0, 5])
def test_adam_reproduces_torch(cls, kwargs, steps):
    model = _model()
    opt = cls(model.parameters(), **kwargs)
    _check_step(opt, model, cf.from_torch, steps=steps)


def test_param_groups_and_frozen_parameters():
    model = _model()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and not n.startswith("mtp.")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    # MTP matrices are left out of the optimizer: a zero update
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": 3e-3}], lr=1e-2
    )
    _check_step(opt, model, cf.from_torch, steps=3)
    counterfactual = cf.from_torch(opt, dict(model.named_parameters()))
    grads = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    u = counterfactual.update({k: p.detach() for k, p in model.named_parameters()}, grads)
    assert torch.equal(u["mtp.0.proj.weight"], torch.zeros_like(u["mtp.0.proj.weight"]))


def test_counterfactual_leaves_torch_state_untouched():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(3):
        _grads(model, s)
        opt.step()
    state_before = copy.deepcopy(opt.state_dict())
    params_before = {k: p.detach().clone() for k, p in model.named_parameters()}
    counterfactual = cf.from_torch(opt, dict(model.named_parameters()))
    grads = _grads(model, 7)
    counterfactual.counterfactual(params_before, grads, grads, 0.3)
    counterfactual.update(params_before, grads)
    state_after = opt.state_dict()
    for pid, st in state_before["state"].items():
        for key, value in st.items():
            assert torch.equal(value, state_after["state"][pid][key])
    assert all(torch.equal(params_before[k], p) for k, p in model.named_parameters())


def test_sgd_displacement_is_linear_in_coefficient():
    model = make_problem(dtype=torch.float64).model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for s in range(2):
        _grads(model, s)
        opt.step()
    c = cf.from_torch(opt, dict(model.named_parameters()))
    g = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    h = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    params = {k: p.detach() for k, p in model.named_parameters()}
    out = c.counterfactual(params, g, h, 0.7)
    u_full = c.update(params, {k: g[k] + 0.7 * h[k] for k in g})
    for k in params:
        assert torch.allclose(out.update_rl[k] + out.displacement[k], u_full[k], rtol=1e-12, atol=1e-15)
        # δ₁ = −η(1 + μ(1−dampening)) ∇L for Nesterov with an existing buffer
        assert torch.allclose(out.unit_displacement[k], -0.1 * 1.9 * h[k], rtol=1e-14)


def test_adam_unit_displacement_is_the_derivative_when_rl_gradient_vanishes():
    """With ∇J = 0 the second moment has zero derivative in λ at λ = 0, so δ₁ must equal the
    exact derivative dδ/dλ — checked by central differences of real counterfactual steps."""
    torch.manual_seed(0)
    params = {"w": torch.randn(5, 3, dtype=torch.float64)}
    state = {"w": {"step": torch.tensor(4.0), "exp_avg": torch.randn(5, 3, dtype=torch.float64) * 0.1,
                   "exp_avg_sq": torch.rand(5, 3, dtype=torch.float64) * 0.01}}
    opt = cf.AdamW(cf.AdamHyper(lr=1e-2, weight_decay=0.1), state)
    zero = {"w": torch.zeros(5, 3, dtype=torch.float64)}
    h = {"w": torch.randn(5, 3, dtype=torch.float64)}
    eps = 1e-6
    plus = opt.counterfactual(params, zero, h, eps).displacement["w"]
    minus = opt.counterfactual(params, zero, h, -eps).displacement["w"]
    deriv = (plus - minus) / (2 * eps)
    unit = opt.counterfactual(params, zero, h, 1.0).unit_displacement["w"]
    assert torch.allclose(deriv, unit, rtol=1e-7, atol=0)


def test_adam_fresh_state_and_bad_hyperparameters():
    params = {"w": torch.ones(3)}
    opt = cf.AdamW(cf.AdamHyper(lr=0.1, weight_decay=0.0))
    u = opt.update(params, {"w": torch.tensor([1.0, -2.0, 0.5])})
    # first Adam step: −lr·sign(g) up to ε
    assert torch.allclose(u["w"], torch.tensor([-0.1, 0.1, -0.1]), rtol=1e-6)
    with pytest.raises(ValueError, match="lr"):
        cf.AdamW(cf.AdamHyper(lr=-1.0))
    with pytest.raises(ValueError, match="betas"):
        cf.AdamW(cf.AdamHyper(lr=0.1, betas=(1.0, 0.9)))
    with pytest.raises(TypeError, match="unsupported optimizer"):
        cf.from_torch(torch.optim.RMSprop([torch.nn.Parameter(torch.ones(1))]), {"x": torch.ones(1)})
    with pytest.raises(ValueError, match="none of named_params"):
        cf.from_torch(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), {"x": torch.ones(1)})


def _state_after(cls, kwargs, steps: int, shapes, seed: int = 0):
    """Parameters and a real torch optimizer state after ``steps − 1`` steps on random gradients
    (float64), so that the next step is step ``steps``."""
    gen = torch.Generator().manual_seed(seed)
    params = {f"p{i}": torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for i, s in enumerate(shapes)}
    opt = cls(params.values(), **kwargs)
    for _ in range(steps - 1):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
    return params, opt, gen


OPTIMIZERS = [
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, amsgrad=True)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
]


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
@pytest.mark.parametrize("step", [1, 2, 10, 100])
def test_unit_displacement_is_the_derivative_of_the_step(cls, kwargs, step):
    """δ₁ = dδ/dλ at λ = 0, against a central difference of the real step in λ (float64), with
    ∇J ≠ 0 and ∇L_MTP not parallel to it: the second moment's dependence on λ included."""
    params, opt, gen = _state_after(cls, kwargs, step, [(7, 5), (11,)], seed=step)
    named = dict(params)
    cf_opt = cf.from_torch(opt, named)
    theta = {k: v.detach() for k, v in named.items()}
    rl = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in theta.items()}
    mtp = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in theta.items()}
    unit = cf_opt.counterfactual(theta, rl, mtp, 0.0).unit_displacement
    h = 1e-5
    plus = cf_opt.counterfactual(theta, rl, mtp, h).displacement
    minus = cf_opt.counterfactual(theta, rl, mtp, -h).displacement
    for k in theta:
        central = (plus[k] - minus[k]) / (2 * h)
        scale = float(central.abs().max())
        err = float((unit[k] - central).abs().max())
        assert err <= 1e-6 * max(scale, 1.0), (k, err, scale)
    if cls is not torch.optim.SGD:
        # the frozen-preconditioner formula (first moment's path only) is measurably different
        st = cf_opt._moments(list(theta)[0], theta["p0"], rl["p0"])
        frozen = mtp["p0"] * st[3] / st[1] * -st[2]
        assert float((frozen - unit["p0"]).abs().max()) > 1e-3 * float(unit["p0"].abs().max())


def test_adam_unit_displacement_is_nearly_flat_at_the_first_step():
    """At Adam's first step the update is ≈ −η·sign(G): dδ/dλ ≈ η·ε·g_MTP/|G|² ≈ 0."""
    params, opt, gen = _state_after(torch.optim.AdamW, dict(lr=1e-2), 1, [(50,)])
    cf_opt = cf.from_torch(opt, params)
    theta = {k: v.detach() for k, v in params.items()}
    rl = {"p0": torch.randn(50, generator=gen, dtype=torch.float64)}
    mtp = {"p0": torch.randn(50, generator=gen, dtype=torch.float64)}
    unit = cf_opt.counterfactual(theta, rl, mtp, 0.0).unit_displacement["p0"]
    frozen = 1e-2 * mtp["p0"] / (rl["p0"].abs() + 1e-8)
    assert float(unit.abs().max()) < 1e-6 * float(frozen.abs().max())


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
@pytest.mark.parametrize("step", [1, 10])
def test_displacement_alone_equals_the_counterfactual_displacement(cls, kwargs, step):
    """``displacement(λ)`` (multi-tensor path for Adam) equals ``counterfactual(λ).displacement``."""
    params, opt, gen = _state_after(cls, kwargs, step, [(7, 5), (11,), (3,)], seed=step)
    cf_opt = cf.from_torch(opt, params)
    theta = {k: v.detach() for k, v in params.items()}
    rl = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in theta.items()}
    mtp = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in theta.items()}
    base = cf_opt.counterfactual(theta, rl, mtp, 0.3)
    for coef in (0.3, -2.0, 50.0):
        full = cf_opt.counterfactual(theta, rl, mtp, coef).displacement
        alone = cf_opt.displacement(theta, rl, mtp, coef, base.update_rl)
        for k in theta:
            assert torch.allclose(alone[k], full[k], rtol=1e-10, atol=1e-15), k


def test_displacement_in_bounded_runs_of_tensors_is_bit_identical(monkeypatch):
    """Multi-tensor passes over runs of at most ``GROUP_ELEMENTS`` elements (bounding the
    temporaries of a large model) give the bits of one pass over the whole group."""
    params, opt, gen = _state_after(torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), 5,
                                    [(7, 5), (11,), (3,), (40,), (2, 2)], seed=3)
    cf_opt = cf.from_torch(opt, params)
    theta = {k: v.detach() for k, v in params.items()}
    rl = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in theta.items()}
    mtp = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in theta.items()}
    base = cf_opt.counterfactual(theta, rl, mtp, 0.3)
    whole = cf_opt.displacement(theta, rl, mtp, 0.7, base.update_rl)
    assert bounded_runs(list(theta), theta, 12) == [["p0"], ["p1"], ["p2"], ["p3"], ["p4"]]
    assert bounded_runs(list(theta), theta, 50) == [["p0", "p1", "p2"], ["p3", "p4"]]
    monkeypatch.setattr(cf, "GROUP_ELEMENTS", 12)
    runs = cf_opt.displacement(theta, rl, mtp, 0.7, base.update_rl)
    assert all(torch.equal(runs[k], whole[k]) for k in theta)


@pytest.mark.parametrize("cls,kwargs", [*OPTIMIZERS, (torch.optim.SGD, dict(lr=0.1, momentum=0.9))])
@pytest.mark.parametrize("step", [1, 2, 10])  # 1: a fresh state
def test_displacements_at_many_coefficients_equal_one_at_a_time(cls, kwargs, step):
    """``displacements(coefs)`` (the step rule broadcast over the coefficients) equals
    ``displacement(λ)`` at each ``λ`` to float64 rounding, the fallbacks (a fresh state at step 0,
    AMSGrad, coupled decay) and SGD included."""
    params, opt, gen = _state_after(cls, kwargs, step, [(7, 5), (11,), (3,)], seed=step + 1)
    cf_opt = cf.from_torch(opt, params)
    theta = {k: v.detach() for k, v in params.items()}
    rl = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in theta.items()}
    mtp = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in theta.items()}
    base = cf_opt.counterfactual(theta, rl, mtp, 0.3)
    coefs = [-1e6, -3.0, -0.01, 0.3, 2.0, 1e4]
    many = cf_opt.displacements(theta, rl, mtp, coefs, base.update_rl)
    for i, coef in enumerate(coefs):
        alone = cf_opt.displacement(theta, rl, mtp, coef, base.update_rl)
        for k in theta:
            assert many[k].shape == (len(coefs), *theta[k].shape)
            assert torch.allclose(many[k][i], alone[k], rtol=1e-12, atol=1e-18), (k, coef)
    assert not torch.allclose(many["p0"][0], many["p0"][-1])  # the coefficients' rows differ


def test_step_updates_give_their_own_displacement_at_their_own_coefficient():
    from conftest import make_problem

    from decomp.objectives import objectives
    from decomp.regimes import Policy
    from decomp.updates import step_updates

    problem = make_problem(seed=0, batch_size=6)
    obj = objectives(problem.model, problem.batch, Policy(scale=0.1), coef=0.1, clip=(0.2, 0.2))
    step = step_updates(obj.rl_objective, obj.mtp_loss, dict(problem.model.named_parameters()), coef=0.1, lr=1e-2,
                        optimizer="adamw", rl_loss=obj.rl_loss)
    many = step.displacements([2.0, 0.1, -5.0])
    for i, coef in enumerate([2.0, 0.1, -5.0]):
        one = step.displacement(coef)
        assert all(torch.allclose(many[k][i], one[k], rtol=1e-12, atol=1e-18) for k in one), coef
    assert all(torch.equal(many[k][1], step.updates.displacement[k]) for k in many)
