"""MTP modules on tiny randomly initialised Hugging Face causal LMs (no downloads)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed: pip install -e '.[hf]'")

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from decomp.curvature import flatten, hvp  # noqa: E402
from decomp.models.hf import attach_mtp, load_mtp, norms_in_float64, save_mtp  # noqa: E402
from decomp.objectives import (  # noqa: E402
    RolloutBatch,
    aligned_logprobs,  # noqa: E402
    model_logprobs,
    objectives,
)
from decomp.regimes import CrossEntropy, Detach, DetachInputs  # noqa: E402

HOSTS = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}


def _lm(kind: str = "llama", tie: bool = False, attn: str = "sdpa", seed: int = 0):
    cls, cfg_cls = HOSTS[kind]
    torch.manual_seed(seed)
    cfg = cfg_cls(vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, attn_implementation=attn)
    lm = cls(cfg).double().eval()
    with torch.no_grad():  # larger weights than the default init, so curvature is not negligible
        for p in lm.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return lm


@pytest.mark.parametrize("kind", list(HOSTS))
def test_a_float64_evaluation_resolves_changes_below_float32_resolution(kind):
    """A float64 forward of the MTP model moves with a parameter change of 1e-7 as its float64
    derivative says (central differences to 1e-6), where the host's own forward, whose RMSNorms
    cast to float32, cannot: the realized changes of a real LM's tiny steps need the former."""
    from torch.func import functional_call

    lm = _lm(kind)
    model = attach_mtp(lm, depth=1)
    tokens = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    direction = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}

    def value(eps, host: bool = False):
        point = {k: p + eps * direction[k] for k, p in params.items()}
        if host:
            logits = functional_call(model.lm, {k[3:]: v for k, v in point.items() if k.startswith("lm.")},
                                     (), {"input_ids": tokens}).logits
        else:
            logits = functional_call(model, point, (tokens,), {"with_mtp": False})[0]
        return logits.log_softmax(-1)[..., 5].sum()

    eps0 = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(value(eps0), eps0)
    for eps in (1e-7, 1e-8):
        fd = (value(eps) - value(-eps)) / (2 * eps)
        assert abs(float(fd - slope)) <= 1e-6 * abs(float(slope)), eps
    host_fd = (value(1e-8, host=True) - value(-1e-8, host=True)) / 2e-8
    assert abs(float(host_fd - slope)) > 1e-4 * abs(float(slope))


@pytest.mark.parametrize("kind", list(HOSTS))
def test_main_logits_are_the_host_lm_and_mtp_shapes(kind):
    lm = _lm(kind)
    model = attach_mtp(lm, depth=2)
    tokens = torch.randint(0, 37, (3, 9))
    main, mtp = model(tokens)
    with norms_in_float64(lm):  # a float64 model keeps its norms in float64 (see the next test)
        assert torch.equal(main, lm(input_ids=tokens).logits)
    assert torch.allclose(main, lm(input_ids=tokens).logits, rtol=0, atol=1e-5)  # the host's float32 norms
    assert [t.shape for t in mtp] == [(3, 8, 37), (3, 7, 37)]
    # copy_last: each block starts as a copy of the last decoder layer, with its own parameters
    last = dict(lm.get_decoder().layers[-1].named_parameters())
    for name, p in model.mtp[0].block.named_parameters():
        assert torch.equal(p, last[name]) and p.data_ptr() != last[name].data_ptr()
    assert model.shared_parameter_names() == [n for n, _ in model.named_parameters() if n.startswith("lm.")]


def test_mtp_depth_one_sees_the_next_token_and_predicts_the_one_after():
    model = attach_mtp(_lm(), depth=1, init="random")
    tokens = torch.randint(0, 37, (1, 8))
    _, (base,) = model(tokens)
    t = 3
    changed = tokens.clone()
    changed[0, t + 1] = (changed[0, t + 1] + 1) % 37
    _, (out,) = model(changed)
    assert not torch.allclose(out[0, t], base[0, t]) and torch.equal(out[0, :t], base[0, :t])
    changed = tokens.clone()
    changed[0, t + 2] = (changed[0, t + 2] + 1) % 37
    _, (out,) = model(changed)
    assert torch.allclose(out[0, : t + 1], base[0, : t + 1], rtol=1e-12, atol=1e-12)
    main, mtp = model(tokens)
    logp, mtp_logp, valid = aligned_logprobs(main, mtp, tokens)
    j = 5  # token y_6: MTP depth 1 predicted it at position 4
    assert mtp_logp[0][0, j] == torch.log_softmax(mtp[0][0, j - 1], -1)[tokens[0, j + 1]]


@pytest.mark.parametrize("kind", list(HOSTS))
def test_left_padding_does_not_change_real_positions(kind):
    model = attach_mtp(_lm(kind), depth=2, init="random")
    x = torch.randint(3, 37, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    main, mtp = model(x)
    main_p, mtp_p = model(padded, attention_mask=mask)
    assert torch.allclose(main_p[:, 3:], main, rtol=1e-10, atol=1e-10)
    for k, (a, b) in enumerate(zip(mtp, mtp_p, strict=True), start=1):
        assert torch.allclose(b[:, 3:], a, rtol=1e-10, atol=1e-10), k


def _batch(model, tie=False):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 37, (4, 10), generator=g)
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[:, 4:] = True
    adv = torch.randn(4, 1, generator=g, dtype=torch.float64).expand(4, 9) * mask
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        old, _, _ = model_logprobs(model, params, tokens)
    return RolloutBatch(tokens, mask, adv, old, response_start=3), params


@pytest.mark.parametrize(
    "regime,tie,expected",
    [
        (Detach(), False, set()),
        (DetachInputs(), False, {"lm.lm_head.weight"}),
        (DetachInputs(), True, {"lm.model.embed_tokens.weight"}),  # tied: the head is the embedding
        (CrossEntropy(), False, None),
    ],
    ids=["detach", "detach-inputs", "detach-inputs-tied", "ce"],
)
def test_detach_modes_reach_shared_parameters_only_where_the_design_says(regime, tie, expected):
    model = attach_mtp(_lm(tie=tie), depth=1)
    batch, params = _batch(model)
    grads = torch.func.grad(objectives(model, batch, regime).mtp_loss)(params)
    shared = set(model.shared_parameter_names())
    reached = {k for k in shared if float(grads[k].abs().max()) > 0}
    if expected is None:
        assert "lm.model.layers.0.self_attn.q_proj.weight" in reached and "lm.model.embed_tokens.weight" in reached
    else:
        assert reached == expected
    assert all(float(grads[k].abs().max()) > 0 for k in grads if k.startswith("mtp.") and "proj" in k)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hvp_through_the_models_attention_matches_finite_differences(attn):
    """Hugging Face's RMSNorm and rotary embeddings compute in float32 even in a float64 model,
    so the function itself is only float32-smooth: the two AD methods agree to ~1e-7 and central
    differences (step 1e-4, truncation ~1e-5 here) to ~1e-4, not to the 1e-10 of the built-in
    model."""
    model = attach_mtp(_lm(attn=attn), depth=1, init="random")
    batch, params = _batch(model)
    obj = objectives(model, batch, CrossEntropy())
    f = lambda p: obj.rl_objective(p) - 0.3 * obj.mtp_loss(p)  # noqa: E731
    g = torch.Generator().manual_seed(2)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}
    hv = flatten(hvp(f, params, v))
    assert float((hv - flatten(hvp(f, params, v, method="forward"))).norm() / hv.norm()) <= 1e-6
    eps = 1e-4
    gp = torch.func.grad(f)({k: params[k] + eps * v[k] for k in params})
    gm = torch.func.grad(f)({k: params[k] - eps * v[k] for k in params})
    fd = (flatten(gp) - flatten(gm)) / (2 * eps)
    assert float((hv - fd).norm() / fd.norm()) <= 1e-3


def test_save_and_load_round_trip(tmp_path):
    lm = _lm()
    a = attach_mtp(lm, depth=1, init="random", seed=0)
    path = tmp_path / "mtp.safetensors"
    save_mtp(a, path)
    b = attach_mtp(lm, depth=1, init="random", seed=1)
    assert not torch.equal(a.mtp[0].proj.weight, b.mtp[0].proj.weight)
    meta = load_mtp(b, path)
    assert meta["depth"] == "1" and meta["init"] == "random"
    for (na, pa), (nb, pb) in zip(a.mtp.named_parameters(), b.mtp.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    tokens = torch.randint(0, 37, (2, 7))
    assert torch.equal(a(tokens)[1][0], b(tokens)[1][0])
    with pytest.raises(ValueError, match="depth"):
        load_mtp(attach_mtp(lm, depth=2), path)


def test_bad_arguments_and_rng():
    with pytest.raises(TypeError, match="Hugging Face causal LM"):
        attach_mtp(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="init must be"):
        attach_mtp(_lm(), init="zeros")
    lm = _lm()
    rng = torch.get_rng_state()
    attach_mtp(lm, init="random", seed=5)  # seeded and forked: the caller's stream does not move
    assert torch.equal(torch.get_rng_state(), rng)


def _no_seed_all(monkeypatch):
    """Make reseeding every CUDA device (what ``torch.manual_seed`` does) an error."""

    def refuse(seed):
        raise AssertionError(f"torch.cuda.manual_seed_all({seed}) reseeds the caller's CUDA streams")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", refuse)


def test_building_and_sampling_seed_only_forked_generators(monkeypatch, tiny_checkpoint):
    from decomp.training.policies import HFPolicy, load_hf

    _no_seed_all(monkeypatch)
    lm, tokenizer = load_hf(str(tiny_checkpoint))
    rng = torch.get_rng_state()
    a = attach_mtp(lm, depth=2, init="random", seed=3)
    b = attach_mtp(lm, depth=2, init="random", seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    for pa, pb in zip(a.mtp.parameters(), b.mtp.parameters(), strict=True):
        assert torch.equal(pa, pb)  # still a function of the seed
    policy = HFPolicy.__new__(HFPolicy)  # only what _generate needs: no warm-up
    policy.model, policy.tokenizer = a, tokenizer
    policy.pad_id, policy.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    policy.task = type("Task", (), {"max_new_tokens": 5})()
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    mask = torch.ones_like(ids)
    first = policy._generate(ids, mask, seed=11)
    assert torch.equal(policy._generate(ids, mask, seed=11), first)
    policy._generate(ids, mask, seed=None)  # greedy
    assert torch.equal(torch.get_rng_state(), rng)


def test_seeded_fork_arguments():
    from decomp.rng import cuda_index, seeded_fork

    assert cuda_index("cpu") is None and cuda_index(None) is None and cuda_index("cuda:1") == 1
    with pytest.raises(TypeError, match="seed must be"), seeded_fork(1.5):
        pass
    rng = torch.get_rng_state()
    with seeded_fork(7, "cpu"):
        x = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(x, torch.rand(3, generator=torch.Generator().manual_seed(7)))
