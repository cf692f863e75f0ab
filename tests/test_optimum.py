"""λ̂ as a distribution: batched realized gains, the grid search on known curves (two peaks,
negative side), the bootstrap over groups against an independent computation, and the coverage
of its 95% interval on a synthetic objective with a known optimum."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_problem
from test_search import _adamw

from decomp.decomposition import decompose_updates
from decomp.objectives import objectives
from decomp.realized import RealizedGain
from decomp.regimes import Policy
from decomp.search import bootstrap_optimum, grid_search, grid_size, realized_optimum
from decomp.updates import step_updates


def _step(seed: int = 0, batch_size: int = 8):
    problem = make_problem(seed=seed, batch_size=batch_size)
    obj = objectives(problem.model, problem.batch, Policy(scale=0.1), coef=0.1, clip=(0.2, 0.2))
    params = problem.params
    step = step_updates(obj.rl_objective, obj.mtp_loss, params, coef=0.1, optimizer=_adamw(params, lr=1e-2),
                        rl_loss=obj.rl_loss)
    return obj, step, list(torch.arange(batch_size).split(2))


def test_batched_gains_equal_one_at_a_time_in_float64():
    """at_coefs (one vmapped forward over stacked AdamW points) = gain(λ) and at_with_parts one at a
    time, totals and each group's part; the parts add to the totals; ΔJ(0) = 0 exactly."""
    obj, step, groups = _step()
    coefs = [0.0, 1e-3, -0.05, 0.3, 2.0, -7.5, 40.0, 1e4]
    gain = RealizedGain(obj.rl_objective, step)
    totals, parts = gain.at_coefs(coefs, groups)
    assert gain.batched  # vmap ran the built-in model
    single = RealizedGain(obj.rl_objective, step)
    for k, c in enumerate(coefs):
        if c == 0.0:
            assert totals[k] == 0.0 and not parts[k].any()
            continue
        total, part = single.at_with_parts(step.displacement(c), groups)
        assert totals[k] == pytest.approx(single(c), rel=1e-12, abs=1e-17)
        assert totals[k] == pytest.approx(total, rel=1e-12, abs=1e-17)
        np.testing.assert_allclose(parts[k], part, rtol=1e-11, atol=1e-17)
        assert parts[k].sum() == pytest.approx(totals[k], rel=1e-10, abs=1e-16)
    assert np.abs(totals).max() > 1e-4  # the points move J: the comparison is not of zeros
    # the loop (a model vmap cannot run) gives the same values
    single.batched = False
    loop, loop_parts = single.at_coefs(coefs, groups)
    np.testing.assert_allclose(loop, totals, rtol=1e-12, atol=1e-17)
    np.testing.assert_allclose(loop_parts, parts, rtol=1e-11, atol=1e-17)


def test_the_mtp_modules_own_parameters_stay_put_and_the_gains_do_not_change():
    """With the step's ``shared`` names the points move the policy's parameters alone (J does not
    read the MTP module's): the gains equal those of points that move every parameter, to float64
    rounding, batched and one at a time, and in a float64 evaluation of a float64 model."""
    problem = make_problem(seed=3, batch_size=8)
    obj = objectives(problem.model, problem.batch, Policy(scale=0.1), coef=0.1, clip=(0.2, 0.2))
    params, groups = problem.params, list(torch.arange(8).split(2))
    kw = dict(coef=0.1, rl_loss=obj.rl_loss)
    every = step_updates(obj.rl_objective, obj.mtp_loss, params, optimizer=_adamw(params, lr=1e-2), **kw)
    policy = step_updates(obj.rl_objective, obj.mtp_loss, params, optimizer=_adamw(params, lr=1e-2),
                          shared=problem.model.shared_parameter_names(), **kw)
    moving = RealizedGain(obj.rl_objective, policy)
    assert moving._fixed and set(moving._fixed).isdisjoint(policy.shared)  # the MTP module's, left at θ
    assert any(float(policy.displacement(2.0)[k].abs().max()) > 0 for k in moving._fixed)  # they would move
    coefs = [-3.0, 0.05, 0.1, 4.0, 300.0]
    for dtype in (None, torch.float64):
        a, pa = RealizedGain(obj.rl_objective, every, dtype).at_coefs(coefs, groups)
        b, pb = RealizedGain(obj.rl_objective, policy, dtype).at_coefs(coefs, groups)
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-17)
        np.testing.assert_allclose(pb, pa, rtol=1e-11, atol=1e-17)
        assert np.abs(a).max() > 1e-4
    assert RealizedGain(obj.rl_objective, policy)(4.0) == pytest.approx(RealizedGain(obj.rl_objective, every)(4.0),
                                                                        rel=1e-12)


def test_a_coefficient_is_evaluated_once_and_the_estimates_ride_in_the_search_batch():
    """at_coefs keeps what it evaluated (a coefficient asked again costs no forward), and the
    estimates given to searched(also=) are evaluated in the search's batch: gains() then runs
    nothing, with the values of a fresh evaluation."""
    obj, step, groups = _step()
    gain = RealizedGain(obj.rl_objective, step)
    first, parts = gain.at_coefs([0.3, -2.0], groups)
    n = gain.evaluations
    again, again_parts = gain.at_coefs([-2.0, 0.0, 0.3], groups)
    assert gain.evaluations == n
    assert again.tolist() == [first[1], 0.0, first[0]] and np.array_equal(again_parts[[0, 2]], parts[[1, 0]])
    gain.at_coefs([0.3, 5.0])
    assert gain.evaluations == n + 1  # only 5.0
    measured = decompose_updates(step, obj.rl_objective, groups=groups).searched(also=[0.37, -1.2, math.nan])
    n = measured.gain.evaluations
    gains = measured.gains([0.37, -1.2, math.nan])
    assert measured.gain.evaluations == n and math.isnan(gains[2])
    fresh = decompose_updates(step, obj.rl_objective, groups=groups).gains([0.37, -1.2])
    assert gains[:2] == pytest.approx(fresh, rel=1e-12, abs=1e-17) and abs(fresh[0]) > 0


def test_step_measurement_gains_and_sweep_use_the_batch():
    from decomp.sweep import sweep_coefficients

    obj, step, _ = _step(seed=2)
    m = decompose_updates(step, obj.rl_objective)
    coefs = [0.5, -3.0, math.nan, 20.0]
    got = m.gains(coefs)
    assert math.isnan(got[2])
    for c, v in zip(coefs, got, strict=True):
        if math.isfinite(c):
            assert v == pytest.approx(m.gain(c), rel=1e-12, abs=1e-17)
    sweep = sweep_coefficients(m, [0.5, -3.0])
    assert sweep.realized == pytest.approx([m.gain(0.5), m.gain(-3.0)], rel=1e-12, abs=1e-17)


def _curve(fn):
    def evaluate(coefs):
        return np.array([fn(c) for c in coefs], dtype=np.float64), None
    return evaluate


def test_grid_finds_the_higher_of_two_peaks_on_either_side():
    """No single-peak assumption: a small peak near 0 and the global one far out (both signs; a
    peak must be about a decade wide for the one-point-per-decade grid to see it)."""
    def two(center, far):
        return lambda x: math.exp(-((x - center) / 0.3) ** 2) + 2 * math.exp(-(math.log(abs(x / far)) / 1.0) ** 2) \
            if x * far > 0 else math.exp(-((x - center) / 0.3) ** 2)
    for center, far in ((0.5, 3000.0), (0.5, -3000.0), (-0.5, 2e-2)):
        opt = grid_search(_curve(two(center, far)))
        assert opt.reason == "" and opt.coef * far > 0
        assert abs(opt.coef / far - 1) <= 0.1, (center, far, opt.coef)
    # a negative optimum of a parabola
    opt = grid_search(_curve(lambda x: -((x + 250.0) ** 2) + 250.0**2))
    assert opt.reason == "" and abs(opt.coef / -250.0 - 1) <= 0.1 and opt.gain > 0.98 * 250.0**2


def test_no_coefficient_beats_zero_and_no_effect():
    opt = grid_search(_curve(lambda x: -x * x))
    assert opt.coef == 0.0 and opt.gain == 0.0 and opt.reason == ""
    flat = grid_search(_curve(lambda x: 0.0))
    assert math.isnan(flat.coef) and flat.reason.startswith("ΔJ(λ) = 0")
    assert flat.evaluations == grid_size()


def test_extra_coefficients_are_evaluated_but_never_candidates():
    """λ* passed as ``extra`` is reported but cannot become λ̂ (λ̂ is not close to λ* by construction)."""
    opt = grid_search(_curve(lambda x: 3.3**2 - (x - 3.3) ** 2), extra=[3.3])
    assert opt.extra_gains == (3.3**2,) and 3.3 not in opt.coefs and opt.coef != 3.3
    assert abs(opt.coef - 3.3) <= 0.33


def _bootstrap_by_hand(coefs, parts, resamples, seed):
    """The same resamples (the same generator calls) evaluated one by one in Python."""
    rng = np.random.default_rng(seed)
    k, g = parts.shape
    weights = rng.multinomial(g, np.full(g, 1.0 / g), size=resamples)
    order = sorted(range(k), key=lambda i: (abs(coefs[i]), coefs[i]))
    full = [sum(parts[i]) for i in range(k)]
    best = max(order, key=lambda i: (full[i], -order.index(i)))
    hats, wins = [], np.zeros(k)
    for w in weights:
        curve = [sum(float(w[j]) * parts[i, j] for j in range(g)) for i in range(k)]
        top = max(curve)
        hats.append(coefs[next(i for i in order if curve[i] == top)])
        wins += np.array([curve[i] >= curve[best] for i in range(k)])
    hats = sorted(hats)
    lo = hats[math.ceil(0.025 * resamples) - 1]
    hi = hats[math.ceil(0.975 * resamples) - 1]
    near = sorted(coefs[i] for i in range(k) if wins[i] / resamples >= 0.025 or i == best)
    return (lo, hi), sum(h > 0 for h in hats) / resamples, tuple(near)


def test_bootstrap_matches_an_independent_computation():
    rng = np.random.default_rng(3)
    coefs = np.array([-10.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 10.0])
    g = 7
    a, b = 4 + 6 * rng.standard_normal(g), 1 + 0.8 * rng.standard_normal(g)
    parts = (a[None] * coefs[:, None] - b[None] * coefs[:, None] ** 2) / g
    parts[2] = 0.0
    got = bootstrap_optimum(coefs, parts, resamples=400, seed=5)
    want = _bootstrap_by_hand(coefs, parts, 400, 5)
    assert got[0] == want[0] and got[1] == pytest.approx(want[1], abs=1e-15) and got[2] == want[2]
    assert got[0][0] < got[0][1]  # noisy groups: the interval is not a point
    # one group or none: no distribution
    assert math.isnan(bootstrap_optimum(coefs, parts[:, :1])[1])


def test_interval_covers_the_true_optimum_at_its_level():
    """Per-group curves (a_g λ − b_g λ²)/G, a_g ~ N(80, 120²), b_g ~ N(1, 0.5²): the mean curve
    peaks at λ₀ = 40; each replication runs the whole search and its bootstrap. 300 replications:
    the binomial SE of a 95% coverage is 1.3%, so [0.89, 0.99] is a ±3σ band with room for the
    percentile bootstrap's small-sample error at G = 40 and the grid's discreteness (measured:
    0.96, and 0.93–0.955 at G = 16 and other noise levels); a median width below ×4 keeps an
    uninformative interval from passing."""
    rng = np.random.default_rng(1)
    groups, lam0, reps = 40, 40.0, 300
    cover, widths, signs = 0, [], []
    for r in range(reps):
        a = 2 * lam0 * (1 + 1.5 * rng.standard_normal(groups))
        b = 1 + 0.5 * rng.standard_normal(groups)

        def evaluate(coefs, a=a, b=b):
            c = np.asarray(coefs, dtype=np.float64)[:, None]
            parts = (a[None] * c - b[None] * c * c) / groups
            return parts.sum(axis=1), parts

        opt = grid_search(evaluate, resamples=500, seed=r)
        lo, hi = opt.interval
        cover += lo <= lam0 <= hi
        widths.append(hi / lo)
        signs.append(opt.positive_prob)
        assert lo <= opt.coef <= hi and opt.coef in opt.near_optimal
    assert 0.89 <= cover / reps <= 0.99, cover / reps
    assert np.median(widths) < 4.0
    assert np.median(signs) == 1.0


def test_grouped_decomposition_carries_the_distribution():
    obj, step, groups = _step(seed=1)
    m = decompose_updates(step, obj.rl_objective, groups=groups, search=True)
    d = m.decomposition
    assert math.isfinite(d.lambda_hat)
    lo, hi = d.lambda_hat_interval
    assert lo <= hi and 0.0 <= d.lambda_hat_positive_prob <= 1.0
    near = list(d.lambda_hat_near_optimal)
    assert d.lambda_hat in near and near == sorted(near)
    if math.isfinite(d.lambda_star):
        assert d.gain_lambda_star == pytest.approx(m.gain(d.lambda_star), rel=1e-12, abs=1e-17)
    json.dumps(d.to_dict())  # the record stays JSON-serialisable
    plain = decompose_updates(step, obj.rl_objective, search=True).decomposition
    # without groups the refinement runs to rtol; with them it stops at the groups' noise, and the
    # finer optimum lies inside the set the groups cannot tell from λ̂
    assert d.search_evaluations <= plain.search_evaluations
    assert min(near) <= plain.lambda_hat <= max(near)
    assert all(math.isnan(x) for x in plain.lambda_hat_interval) and math.isnan(plain.lambda_hat_positive_prob)
    assert plain.lambda_hat_near_optimal == ()


def test_realized_optimum_accepts_a_scalar_gain_and_no_starting_point():
    f = lambda x: 49.0 - (x - 7.0) ** 2  # noqa: E731
    a = realized_optimum(f)
    assert abs(a.coef - 7.0) <= 0.7 and 0.0 in a.coefs and 1e6 in a.coefs and -1e6 in a.coefs
    with pytest.raises(TypeError):
        realized_optimum(f, start=7.0)  # the grid depends on no estimate
    assert math.isnan(a.positive_prob)
