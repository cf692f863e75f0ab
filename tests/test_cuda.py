"""The measurement library on a CUDA device: same numbers as on the CPU, RNG untouched.

Skipped where no GPU is present (CI); run on a lent GPU machine with `pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_problem

from decomp.decomposition import decompose
from decomp.objectives import RolloutBatch, objectives
from decomp.regimes import CrossEntropy, Policy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _to(problem, device):
    problem.model.to(device)
    b = problem.batch
    problem.batch = RolloutBatch(*(t.to(device) for t in (b.tokens, b.mask, b.advantages, b.old_logp)))
    return problem


@pytest.mark.parametrize("regime", [CrossEntropy(), Policy()], ids=["ce", "policy"])
@pytest.mark.parametrize("hvp_method", ["autograd", "reverse", "forward"])
def test_cuda_float64_decomposition_equals_cpu(regime, hvp_method):
    cpu = make_problem(seed=0)
    gpu = _to(make_problem(seed=0), "cuda")
    results = []
    for problem in (cpu, gpu):
        obj = objectives(problem.model, problem.batch, regime)
        results.append(decompose(obj.rl_objective, obj.mtp_loss, problem.params, lr=1e-2, coef=0.3, hvp_method=hvp_method))
    a, b = results
    for key in ("correlation", "cross", "penalty", "realized", "lambda_star", "grad_norm_rl"):
        assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-8, abs=1e-14, nan_ok=True), key


def test_cuda_rng_and_live_adamw_state_untouched():
    problem = _to(make_problem(dtype=torch.float32, seed=1), "cuda")
    model = problem.model
    obj = objectives(model, problem.batch, Policy())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    named = dict(model.named_parameters())
    (-obj.rl_objective(named) + 0.1 * obj.mtp_loss(named)).backward()
    opt.step()
    before = torch.cuda.get_rng_state()
    params = {k: p.detach().clone() for k, p in named.items()}
    d = decompose(lambda p: obj.rl_objective(p) + 0 * torch.rand((), device="cuda"), obj.mtp_loss, named, coef=0.1, optimizer=opt)
    assert torch.equal(torch.cuda.get_rng_state(), before)
    assert all(torch.equal(params[k], p) for k, p in named.items())
    assert d.optimizer == "adamw"
