"""The realized optimum λ̂ (a grid over real counterfactual steps, refined near the best), the
held-out evaluation objective, and their input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_problem
from test_decomposition import _quadratic

from decomp import optim as cf
from decomp.decomposition import decompose, measure_step
from decomp.objectives import objectives
from decomp.regimes import Detach, Policy
from decomp.search import BUDGET, MAX_SEARCH_EVALUATIONS, NO_EFFECT, grid_size, realized_optimum


def test_sgd_on_a_quadratic_the_realized_optimum_is_lambda_star():
    """With SGD on a quadratic, ΔJ(λ) is exactly the model's parabola: λ̂ = λ* (to 1e-6)."""
    for seed in (0, 1, 4):
        J, L, params, _ = _quadratic(seed=seed)
        d = decompose(J, L, params, lr=0.1, coef=0.3, search=True, search_rtol=1e-7, search_evaluations=200)
        assert math.isfinite(d.lambda_star) and d.lambda_hat_reason == ""
        assert d.lambda_hat == pytest.approx(d.lambda_star, rel=1e-6)
        assert d.gain_hat == pytest.approx(d.gain_lambda_star, rel=1e-9)
        assert d.lambda_hat != d.lambda_star  # found by the grid, not started from λ*
        assert grid_size() < d.search_evaluations <= 200
        # the default resolution: within 10% of λ* in at most the default budget
        d = decompose(J, L, params, lr=0.1, coef=0.3, search=True)
        assert d.lambda_hat_reason == "" and d.search_evaluations <= MAX_SEARCH_EVALUATIONS
        assert abs(d.lambda_hat / d.lambda_star - 1) <= 0.1


def _adamw(params, step=4, lr=0.05, seed=0):
    rng = np.random.default_rng(seed)
    state = {k: {"step": torch.tensor(float(step)), "exp_avg": torch.tensor(0.1 * rng.standard_normal(p.shape)),
                 "exp_avg_sq": torch.tensor(0.05 * rng.random(p.shape))} for k, p in params.items()}
    return cf.AdamW(cf.AdamHyper(lr=lr, weight_decay=0.01), state)


def test_adamw_on_a_quadratic_the_search_matches_a_dense_grid():
    """Real (nonlinear) AdamW steps: λ̂ is within one spacing of the best of 10⁴ coefficients."""
    J, L, params, _ = _quadratic(seed=2)
    opt = _adamw(params)
    m = measure_step(J, L, params, coef=0.3, optimizer=opt, search=True, search_rtol=1e-6,
                     search_evaluations=200)
    d = m.decomposition
    assert d.lambda_hat_reason == "" and math.isfinite(d.lambda_hat)
    lo, hi = -4 * abs(d.lambda_hat) - 1, 4 * abs(d.lambda_hat) + 1
    grid = np.linspace(lo, hi, 10_000)
    gains = np.array(m.gains([float(x) for x in grid]))
    spacing = grid[1] - grid[0]
    assert abs(d.lambda_hat - grid[np.argmax(gains)]) <= spacing
    assert d.gain_hat >= gains.max() - 1e-12
    # the quadratic model's optimum is not the real one under Adam, and is realized worse
    assert d.gain_lambda_star <= d.gain_hat


def test_gain_still_rising_at_the_bound_is_reported():
    f = lambda lam: lam / (1.0 + lam) if lam > 0 else -abs(lam)  # noqa: E731  (saturates, never falls)
    opt = realized_optimum(f, bound=100.0)
    assert opt.coef == 100.0 and "keeps rising" in opt.reason
    assert opt.evaluations == grid_size()  # nothing to refine at the bound
    neg = realized_optimum(lambda lam: f(-lam), bound=100.0)
    assert neg.coef == -100.0 and "keeps rising" in neg.reason


def test_search_respects_its_evaluation_budget_and_says_it_ran_out():
    calls = []

    def f(lam):
        calls.append(lam)
        return -(lam - 3.0) ** 2 + 9.0

    budget = grid_size() + 12  # the grid and two of the three rounds rtol = 1e-12 would need at least
    opt = realized_optimum(f, max_evaluations=budget, rtol=1e-12)
    assert len(calls) <= budget and opt.evaluations == len(calls)
    assert opt.reason == BUDGET.format(evaluations=budget, rtol=1e-12)
    assert opt.gain == max(-(x - 3.0) ** 2 + 9.0 for x in calls) and opt.coef in calls
    assert abs(opt.coef - 3.0) < 0.7  # two rounds from the grid's 1 and 10 (spacing ×1.93, then ×1.21)
    with pytest.raises(ValueError, match="grid"):
        realized_optimum(f, max_evaluations=grid_size() - 1)


def test_detach_direction_has_no_realized_optimum():
    problem = make_problem(seed=3)
    obj = objectives(problem.model, problem.batch, Detach())
    d = decompose(obj.rl_objective, obj.mtp_loss, problem.params, lr=0.05, coef=0.1, search=True)
    assert math.isnan(d.lambda_hat) and d.lambda_hat_reason == NO_EFFECT


def test_held_out_objective_shares_the_updates_and_judges_the_step():
    """eval_objective changes J's side only: the same u_RL, δ and δ₁ as in-sample; g, H and the
    realized change are those of the evaluation objective."""
    train = make_problem(seed=5)
    held = make_problem(seed=6)  # another batch (and the same model weights below)
    held.model.load_state_dict(train.model.state_dict())
    regime = Policy()
    obj_train = objectives(train.model, train.batch, regime)
    obj_held = objectives(train.model, held.batch, regime)
    params = train.params
    opt = _adamw(params, lr=1e-3)
    a = measure_step(obj_train.rl_objective, obj_train.mtp_loss, params, coef=0.2, optimizer=opt)
    b = measure_step(obj_train.rl_objective, obj_train.mtp_loss, params, coef=0.2, optimizer=opt,
                     eval_objective=obj_held.rl_objective)
    c = measure_step(obj_held.rl_objective, obj_train.mtp_loss, params, coef=0.2, optimizer=opt,
                     rl_loss=lambda p: -obj_train.rl_objective(p))
    for k in params:
        assert torch.equal(a.updates.update_rl[k], b.updates.update_rl[k])
        assert torch.equal(a.updates.unit_displacement[k], b.updates.unit_displacement[k])
    assert b.decomposition.rl_objective == pytest.approx(float(obj_held.rl_objective(params)), rel=1e-12)
    assert b.decomposition.correlation != pytest.approx(a.decomposition.correlation, rel=1e-3)
    # the same step judged on the held-out J, built another way (J held out, u_RL from train)
    for key in ("correlation", "cross", "penalty", "realized", "lambda_star"):
        assert getattr(b.decomposition, key) == pytest.approx(getattr(c.decomposition, key), rel=1e-9, nan_ok=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(search=True, search_bound=math.inf), "search_bound"),
    (dict(search=True, search_bound=-1.0), "search_bound"),
    (dict(search=True, search_bound=0.0), "search_bound"),
    (dict(search=True, search_evaluations=1), "search_evaluations"),
    (dict(search=True, search_evaluations=19), "search_evaluations"),
    (dict(search=True, search_rtol=0.0), "search_rtol"),
])
def test_bad_search_arguments_name_the_argument(kwargs, match):
    J, L, params, _ = _quadratic(seed=1)
    with pytest.raises(ValueError, match=match):
        decompose(J, L, params, lr=0.1, coef=0.3, **kwargs)


def test_search_with_an_optimizer_that_cannot_be_stepped_counterfactually():
    problem = make_problem(seed=1)
    obj = objectives(problem.model, problem.batch, Policy())
    opt = torch.optim.RMSprop(problem.model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="optimizer"):
        decompose(obj.rl_objective, obj.mtp_loss, dict(problem.model.named_parameters()), coef=0.1, optimizer=opt,
                  search=True)


def test_non_scalar_or_nonfinite_eval_objective_is_refused():
    J, L, params, _ = _quadratic(seed=1)
    with pytest.raises(ValueError, match="eval_objective"):
        decompose(J, L, params, lr=0.1, coef=0.3, eval_objective=lambda p: torch.stack([J(p), J(p)]))
    with pytest.raises(ValueError, match="non-finite"):
        decompose(J, L, params, lr=0.1, coef=0.3, eval_objective=lambda p: J(p) * math.inf)
