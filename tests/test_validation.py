"""Bad input gets a ValueError/TypeError naming the argument, never a silent nan or a torch trace."""

from __future__ import annotations

import math

import pytest
import torch

from decomp import optim as cf
from decomp.curvature import (
    hessian_operator,
    hvp,
    jvp_logprobs,
    rayleigh_quotient,
    top_eigenvalues,
)
from decomp.decomposition import decompose
from decomp.occ import (
    efficiency,
    masked_coefficient,
    model_efficiency,
    model_gain,
    pooled_coefficient,
    reference_coefficient,
)

P = {"x": torch.tensor([1.0, 2.0], dtype=torch.float64)}
J = lambda p: -(p["x"] ** 2).sum()  # noqa: E731
L = lambda p: (p["x"] ** 4).sum()  # noqa: E731
ESTIMATORS = [reference_coefficient, masked_coefficient, pooled_coefficient]


def _lp():
    x = -torch.rand(2, 3, dtype=torch.float64)
    return x - 0.1, x + 0.01, x, torch.ones(2, 3, dtype=torch.bool)


@pytest.mark.parametrize("fn", ESTIMATORS)
@pytest.mark.parametrize("position,name", [(0, "mtp_logp"), (1, "logp"), (2, "old_logp")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_logprobs_are_refused_by_name(fn, position, name, bad):
    args = list(_lp())
    args[position] = args[position].clone()
    args[position][0, 1] = bad
    with pytest.raises(ValueError, match=rf"^{name} contains"):
        fn(*args, 0.1)


@pytest.mark.parametrize("fn", ESTIMATORS)
def test_mismatched_shapes_and_bad_masks(fn):
    m, l, old, mask = _lp()
    with pytest.raises(ValueError, match="shape mismatch: logp"):
        fn(m, l[:, :2], old, mask, 0.1)
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        fn(m, l, old, mask.double() * 2, 0.1)
    with pytest.raises(ValueError, match="scale must be finite"):
        fn(m, l, old, mask, float("nan"))
    assert math.isnan(float(fn(m, l, old, torch.zeros_like(mask), 0.1)))


def test_decompose_refuses_bad_arguments():
    with pytest.raises(ValueError, match="lr must be non-negative"):
        decompose(J, L, P, lr=-0.1, coef=1.0)
    with pytest.raises(ValueError, match="lr must be finite"):
        decompose(J, L, P, lr=float("inf"), coef=1.0)
    with pytest.raises(ValueError, match="lr is required"):
        decompose(J, L, P, coef=1.0)
    with pytest.raises(ValueError, match="coef must be finite"):
        decompose(J, L, P, lr=0.1, coef=float("nan"))
    with pytest.raises(ValueError, match="rl_objective must return a scalar"):
        decompose(lambda p: p["x"] ** 2, L, P, lr=0.1, coef=1.0)
    with pytest.raises(ValueError, match="mtp_loss must return a scalar"):
        decompose(J, lambda p: p["x"], P, lr=0.1, coef=1.0)
    with pytest.raises(TypeError, match="rl_objective must be callable"):
        decompose(3.0, L, P, lr=0.1, coef=1.0)
    with pytest.raises(TypeError, match="params must be a dict"):
        decompose(J, L, [P["x"]], lr=0.1, coef=1.0)
    with pytest.raises(TypeError, match=r"params\['i'\] must be a floating-point tensor"):
        decompose(J, L, {"i": torch.ones(2, dtype=torch.long)}, lr=0.1, coef=1.0)
    with pytest.raises(ValueError, match="params is empty"):
        decompose(J, L, {}, lr=0.1, coef=1.0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        decompose(J, L, P, lr=0.1, coef=1.0, optimizer="lion")
    with pytest.raises(ValueError, match="takes no optimizer_state"):
        decompose(J, L, P, lr=0.1, coef=1.0, optimizer="sgd", optimizer_state={"x": {}})
    with pytest.raises(ValueError, match="method must be one of"):
        decompose(J, L, P, lr=0.1, coef=1.0, hvp_method="exact")
    with pytest.raises(ValueError, match="rl_objective returned a non-finite value"):
        decompose(lambda p: p["x"].sum() * float("nan"), L, P, lr=0.1, coef=1.0)
    with pytest.raises(ValueError, match="gradient of mtp_loss is not finite"):
        decompose(J, lambda p: p["x"].sqrt().sum() + (p["x"] * 0).sum(), {"x": torch.zeros(2, dtype=torch.float64)}, lr=0.1, coef=1.0)


def test_hvp_refuses_mismatched_directions():
    with pytest.raises(ValueError, match=r"v keys do not match params: missing \['x'\]; unexpected \['y'\]"):
        hvp(J, P, {"y": torch.ones(2, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"v\['x'\] has shape \(3,\)"):
        hvp(J, P, {"x": torch.ones(3, dtype=torch.float64)})
    with pytest.raises(TypeError, match=r"v\['x'\] has dtype torch.float32"):
        hvp(J, P, {"x": torch.ones(2)})
    with pytest.raises(ValueError, match="f must return a scalar"):
        hvp(lambda p: p["x"], P, P)
    with pytest.raises(ValueError, match="zero vector"):
        rayleigh_quotient(J, P, {"x": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(ValueError, match="k must be smaller"):
        top_eigenvalues(J, P, k=2)
    with pytest.raises(ValueError, match="which must be"):
        top_eigenvalues(J, {"x": torch.ones(5, dtype=torch.float64)}, which="XX")
    with pytest.raises(ValueError, match="needs k >= 2"):
        top_eigenvalues(J, {"x": torch.ones(5, dtype=torch.float64)}, which="BE")
    with pytest.raises(TypeError, match="one dtype"):
        hessian_operator(J, {"x": P["x"], "y": torch.ones(2)})
    with pytest.raises(TypeError, match="logprob_fn must be callable"):
        jvp_logprobs(None, P, P)


def test_gain_and_efficiency_check_lambda():
    d = decompose(J, L, P, lr=0.1, coef=1.0)
    with pytest.raises(ValueError, match="coef must be finite"):
        model_gain(float("inf"), d)
    assert math.isnan(model_efficiency(float("nan"), d))
    assert math.isnan(efficiency(float("nan"), d))  # a realized gain of nan (and no λ̂ searched)


def test_counterfactual_optimizer_type_errors():
    with pytest.raises(TypeError, match="optimizer must be 'sgd'"):
        decompose(J, L, P, lr=0.1, coef=1.0, optimizer=object())
    with pytest.raises(TypeError, match="hyper must be"):
        cf.SGD(0.1)
    with pytest.raises(ValueError, match="nesterov"):
        cf.SGD(cf.SGDHyper(lr=0.1, nesterov=True))
    with pytest.raises(ValueError, match="maximize"):
        p = torch.nn.Parameter(torch.ones(2))
        cf.from_torch(torch.optim.SGD([p], lr=0.1, maximize=True), {"p": p})
