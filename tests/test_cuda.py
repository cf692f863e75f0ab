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


def test_cuda_rng_untouched_by_hf_mtp_build_and_sampling(tiny_checkpoint):
    pytest.importorskip("transformers", reason="the hf extra is not installed: pip install -e '.[hf]'")
    from decomp.models.hf import attach_mtp
    from decomp.training.policies import HFPolicy, load_hf

    lm, tokenizer = load_hf(str(tiny_checkpoint))
    lm.to("cuda")
    torch.cuda.manual_seed(123)
    torch.rand(4, device="cuda")  # a stream that has moved: seed 123, non-zero offset
    before, cpu_before = torch.cuda.get_rng_state(), torch.get_rng_state()
    a = attach_mtp(lm, depth=2, init="random", seed=3)  # random init runs on the GPU block
    assert torch.equal(torch.cuda.get_rng_state(), before)
    b = attach_mtp(lm, depth=2, init="random", seed=3)
    assert all(p.is_cuda and torch.equal(p, q) for p, q in zip(a.mtp.parameters(), b.mtp.parameters(), strict=True))
    policy = HFPolicy.__new__(HFPolicy)  # only what _generate needs: no warm-up
    policy.model, policy.tokenizer = a, tokenizer
    policy.pad_id, policy.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    policy.task = type("Task", (), {"max_new_tokens": 5})()
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]], device="cuda")
    mask = torch.ones_like(ids)
    first = policy._generate(ids, mask, seed=11)
    assert torch.equal(policy._generate(ids, mask, seed=11), first)
    assert torch.equal(torch.cuda.get_rng_state(), before)
    assert torch.equal(torch.get_rng_state(), cpu_before)
