"""Sampling, response masks, KL and the GRPO loss pieces."""

from __future__ import annotations

import torch

from decomp.models.tiny import ModelConfig, MTPTransformer
from decomp.rl import (
    clipped_policy_loss,
    generate,
    importance_objective,
    kl_k3,
    response_mask,
)
from decomp.training.tasks import EOS, PAD


def test_response_mask_keeps_tokens_up_to_the_first_eos():
    r = torch.tensor([[5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(response_mask(r, EOS), expected)


def test_generate_is_a_function_of_the_generator_and_pads_after_eos():
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(vocab_size=8, max_len=12, d_model=16, n_layers=1, n_heads=2, d_mlp=16))
    prompts = torch.randint(0, 8, (16, 4))
    a = generate(model, prompts, 6, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompts, 6, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (16, 6)
    for row in a.tolist():
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1 :])
    g = generate(model, prompts, 6, eos_id=EOS, pad_id=PAD, greedy=True)
    logits, _ = model(prompts)
    assert torch.equal(g[:, 0], logits[:, -1].argmax(-1))


def test_kl_k3_and_surrogates_at_the_old_policy():
    x = -torch.rand(3, 5, dtype=torch.float64)
    y = x + 0.3 * torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(kl_k3(x, x), torch.zeros_like(x))
    assert bool((kl_k3(x, y) >= 0).all())
    adv = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    # at ℓ = ℓ^old the clipped loss is −J, and their gradients agree
    lp = x.clone().requires_grad_()
    loss = clipped_policy_loss(lp, x, adv, mask)
    (g1,) = torch.autograd.grad(loss, lp)
    lp2 = x.clone().requires_grad_()
    (g2,) = torch.autograd.grad(-importance_objective(lp2, x, adv, mask), lp2)
    assert torch.allclose(g1, g2) and torch.isclose(loss, -importance_objective(x, x, adv, mask))
