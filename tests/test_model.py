"""The tiny MTP transformer: shapes, MTP alignment and detach modes (docs/method.md §1-2)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, make_problem

from decomp.models.tiny import ModelConfig, MTPTransformer
from decomp.objectives import aligned_logprobs, objectives
from decomp.regimes import CrossEntropy, Detach, DetachInputs


def test_shapes_for_depth_two():
    cfg = ModelConfig(vocab_size=9, max_len=10, d_model=8, n_layers=1, n_heads=2, d_mlp=16, mtp_depth=2)
    model = MTPTransformer(cfg)
    tokens = torch.randint(0, 9, (3, 7))
    main, mtp = model(tokens)
    assert main.shape == (3, 7, 9)
    assert [t.shape for t in mtp] == [(3, 6, 9), (3, 5, 9)]
    logp, mtp_logp, valid = aligned_logprobs(main, mtp, tokens)
    assert logp.shape == (3, 6) and all(m.shape == (3, 6) for m in mtp_logp)
    assert valid[0][:, 0].eq(False).all() and valid[0][:, 1:].all()
    assert valid[1][:, :2].eq(False).all() and valid[1][:, 2:].all()


def test_mtp_logprob_is_for_the_same_token_as_the_main_logprob():
    """Index j holds log-probs of token y_{j+1}: main from position j, MTP depth k from j−k."""
    cfg = ModelConfig(vocab_size=9, max_len=10, d_model=8, n_layers=1, n_heads=2, d_mlp=16, mtp_depth=2)
    model = MTPTransformer(cfg).double()
    tokens = torch.randint(0, 9, (2, 8))
    main, mtp = model(tokens)
    logp, mtp_logp, valid = aligned_logprobs(main, mtp, tokens)
    for b in range(2):
        for j in range(7):
            y = tokens[b, j + 1]
            assert logp[b, j] == torch.log_softmax(main[b, j], -1)[y]
            for k in (1, 2):
                if j >= k:
                    assert mtp_logp[k - 1][b, j] == torch.log_softmax(mtp[k - 1][b, j - k], -1)[y]
                    assert valid[k - 1][b, j]
                else:
                    assert mtp_logp[k - 1][b, j] == 0 and not valid[k - 1][b, j]


def test_mtp_depth_one_sees_the_next_token_and_predicts_the_one_after():
    """Changing token t+1 changes MTP logits at position t (its input); changing token t+2 does not."""
    model = MTPTransformer(TINY).double()
    tokens = torch.randint(0, TINY.vocab_size, (1, 8))
    _, (base,) = model(tokens)
    t = 3
    changed = tokens.clone()
    changed[0, t + 1] = (changed[0, t + 1] + 1) % TINY.vocab_size
    _, (out,) = model(changed)
    assert not torch.allclose(out[0, t], base[0, t])
    assert torch.equal(out[0, :t], base[0, :t])  # causal
    changed = tokens.clone()
    changed[0, t + 2] = (changed[0, t + 2] + 1) % TINY.vocab_size
    _, (out,) = model(changed)
    assert torch.equal(out[0, : t + 1], base[0, : t + 1])


@pytest.mark.parametrize(
    "regime,nonzero_shared",
    [(Detach(), set()), (DetachInputs(), {"head.weight"}), (CrossEntropy(), None)],
    ids=["detach", "detach-inputs", "ce"],
)
def test_mtp_loss_reaches_shared_parameters_only_where_the_design_says(regime, nonzero_shared):
    problem = make_problem(seed=2)
    obj = objectives(problem.model, problem.batch, regime)
    grads = torch.func.grad(obj.mtp_loss)(problem.params)
    shared = set(problem.model.shared_parameter_names())
    reached = {k for k in shared if float(grads[k].abs().max()) > 0}
    if nonzero_shared is None:
        # ce: the whole trunk learns from the MTP loss; only the main head's final norm is
        # outside the MTP path (MTP reads the trunk state before it)
        assert reached == shared - {"final_norm.weight"}
    else:
        assert reached == nonzero_shared
    assert all(float(grads[k].abs().max()) > 0 for k in grads if k.startswith("mtp.") and "bias" not in k)


def test_bad_detach_mode_and_too_long_sequence():
    model = MTPTransformer(TINY)
    with pytest.raises(ValueError, match="detach"):
        model(torch.zeros(1, 4, dtype=torch.long), detach="trunk")
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, TINY.max_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=10, n_heads=4)


def test_aligned_distill_against_an_explicit_loop():
    """Σ_v p(v)·log q_k(v) with p the main head's detached distribution for token y_{j+1}
    (position j) and q_k MTP depth k's for the same token (position j−k)."""
    from decomp.objectives import aligned_distill

    torch.manual_seed(0)
    B, T, V = 2, 7, 5
    main = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    mtp = [torch.randn(B, T - k, V, dtype=torch.float64, requires_grad=True) for k in (1, 2)]
    got = aligned_distill(main, mtp)
    for k, x in enumerate(got, start=1):
        assert x.shape == (B, T - 1)
        for b in range(B):
            for j in range(T - 1):
                if j < k:
                    assert x[b, j] == 0
                    continue
                p = torch.softmax(main[b, j], -1)
                logq = torch.log_softmax(mtp[k - 1][b, j - k], -1)
                assert torch.allclose(x[b, j], (p * logq).sum())
    # the target is detached: the gradient reaches the MTP logits only
    got[0].sum().backward()
    assert main.grad is None and mtp[0].grad is not None
