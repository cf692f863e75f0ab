"""OCC estimators against a direct NumPy re-implementation (Hypothesis) and their edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_problem
from hypothesis import given, settings
from hypothesis import strategies as st

from decomp import optim as cf
from decomp.objectives import objectives
from decomp.occ import (
    coefficient_from_statistics,
    jvp_coefficient,
    masked_coefficient,
    pooled_coefficient,
    projection_coefficient,
    proxy_coefficients,
    proxy_statistics,
    reference_coefficient,
)
from decomp.regimes import Policy


def np_reference(m, l, old, mask, c):
    # verl: main/old log-probs are zero at padding, MTP log-probs are not
    l, old = l * mask, old * mask
    a, b = m - old, l - old
    return c * np.mean(a * b / (a**2 + 1e-8))


def np_masked(m, l, old, mask, c):
    a, b = (m - old)[mask], (l - old)[mask]
    return c * np.mean(a * b / (a**2 + 1e-8)) if a.size else math.nan


def np_pooled(m, l, old, mask, c):
    a, b = (m - old)[mask], (l - old)[mask]
    if a.size == 0:
        return math.nan
    den = np.sum(a * a)
    return c * np.sum(a * b) / den if den > 0 else 0.0


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_proxy_statistics_add_across_shards_and_match_numpy(data):
    """What the TRL trainer all-reduces: per-shard sums give the estimate on the whole batch."""
    m, l, old, mask, c = data.draw(logprob_batches())
    B = m.shape[0]
    cut = data.draw(st.integers(0, B))
    a, b = torch.tensor(m - old), torch.tensor(l - old)
    tm = torch.tensor(mask)
    stats = proxy_statistics(a[:cut], b[:cut], tm[:cut]) + proxy_statistics(a[cut:], b[cut:], tm[cut:])
    expected = {"masked": np_masked(m, l, old, mask, c), "pooled": np_pooled(m, l, old, mask, c),
                "reference": c * np.sum(np.where(mask, (m - old) * (l - old) / ((m - old) ** 2 + 1e-8), 0.0)) / m.size
                if mask.any() else math.nan}
    for reduction, want in expected.items():
        got = coefficient_from_statistics(stats, c, reduction)
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


@st.composite
def logprob_batches(draw):
    B = draw(st.integers(1, 5))
    T = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    old = -rng.exponential(2.0, (B, T))
    # ℓ near ℓ^old (a few updates in), m far from it (a different head), some exact ties
    l = old + rng.normal(0, draw(st.sampled_from([0.0, 1e-3, 0.1])), (B, T))
    m = old + rng.normal(0, draw(st.sampled_from([1e-5, 0.5, 3.0])), (B, T))
    if draw(st.booleans()):
        m[0, 0] = old[0, 0]
    mask = rng.random((B, T)) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    c = draw(st.floats(-2, 2, allow_nan=False))
    return m, l, old, mask, c


@settings(max_examples=150, deadline=None)
@given(logprob_batches())
def test_proxy_estimators_match_numpy(batch):
    m, l, old, mask, c = batch
    t = [torch.tensor(x) for x in (m, l, old)]
    tm = torch.tensor(mask)
    # verl's tensors: main/old log-probs zero at padding
    got_ref = float(reference_coefficient(t[0], t[1] * tm, t[2] * tm, tm, c))
    for got, expected in (
        (got_ref, np_reference(m, l, old, mask, c) if mask.any() else math.nan),
        (float(masked_coefficient(*t, tm, c)), np_masked(m, l, old, mask, c)),
        (float(pooled_coefficient(*t, tm, c)), np_pooled(m, l, old, mask, c)),
    ):
        if math.isnan(expected):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["reference", "masked", "pooled"]))
def test_jvp_coefficient_matches_numpy_on_a_linear_logprob_model(seed, reduction):
    """For ℓ = Xθ the directional derivatives are X·v exactly, computed independently in NumPy."""
    rng = np.random.default_rng(seed)
    B, T, n = 3, 4, 5
    X = rng.standard_normal((B, T, n))
    theta, d1, u = (rng.standard_normal(n) for _ in range(3))
    mask = rng.random((B, T)) < 0.7
    Xt = torch.tensor(X)
    fn = lambda p: Xt @ p["w"]  # noqa: E731
    got = float(
        jvp_coefficient(
            fn, {"w": torch.tensor(theta)}, {"w": torch.tensor(d1)}, {"w": torch.tensor(u)},
            torch.tensor(mask), 0.3, reduction,
        )
    )
    a, b = X @ d1, X @ u
    zeros = np.zeros_like(a)
    # the NumPy estimators with old = 0: m = a, ℓ = b
    ref = {"reference": np_reference, "masked": np_masked, "pooled": np_pooled}[reduction]
    expected = ref(a, b, zeros, mask, 0.3) if mask.any() else math.nan
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, rel=1e-10, abs=1e-14)


def test_proxy_is_zero_on_the_first_minibatch_update():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g, dtype=torch.float64)
    m = old - torch.rand(4, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    assert all(v == 0.0 for v in proxy_coefficients(m, old.clone(), old, mask, 0.1).values())


def test_reference_counts_padding_in_the_mean():
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 8, generator=g, dtype=torch.float64)
    logp = old + 0.05 * torch.randn(3, 8, generator=g, dtype=torch.float64)
    m = old - torch.rand(3, 8, generator=g, dtype=torch.float64)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :5] = True
    ref = float(reference_coefficient(m, logp, old, mask, 0.2))
    masked = float(masked_coefficient(m, logp, old, mask, 0.2))
    assert ref == pytest.approx(masked * 15 / 24, rel=1e-12)


def test_empty_mask_gives_nan_and_pooled_without_signal_gives_zero():
    x = torch.zeros(2, 3, dtype=torch.float64)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    full = torch.ones(2, 3, dtype=torch.bool)
    for fn in (reference_coefficient, masked_coefficient, pooled_coefficient):
        assert math.isnan(float(fn(x, x, x, empty, 0.1)))
    assert float(pooled_coefficient(x, x + 0.1, x, full, 0.1)) == 0.0


def test_bad_reduction_is_refused():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="reduction"):
        projection_coefficient(x, x, x.bool(), 0.1, "mean")


def test_jvp_estimator_on_the_transformer_does_not_depend_on_the_sgd_step_size():
    """For SGD both δ₁ and u_RL scale with η, so the pooled slope Σab/Σa² does not (the
    masked form's 1e-8 guard breaks this invariance when a is small)."""
    problem = make_problem(seed=3)
    obj = objectives(problem.model, problem.batch, Policy())
    params = problem.params
    g = torch.func.grad(obj.rl_objective)(params)
    gl = torch.func.grad(obj.mtp_loss)(params)
    lams = []
    for lr in (1e-2, 1e-3):
        out = cf.SGD(cf.SGDHyper(lr=lr)).counterfactual(params, {k: -v for k, v in g.items()}, gl, 1.0)
        lams.append(
            float(jvp_coefficient(obj.logprob_fn, params, out.unit_displacement, out.update_rl, problem.batch.mask, 1.0, "pooled"))
        )
    assert math.isfinite(lams[0]) and lams[0] != 0.0
    assert lams[0] == pytest.approx(lams[1], rel=1e-9)
