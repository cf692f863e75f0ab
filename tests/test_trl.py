"""decomp inside TRL's GRPOTrainer: a tiny random Llama (local folder, no downloads) on the
arithmetic prompts of ``add1``, with a dense reward so that advantages are not all zero."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed: pip install -e '.[trl]'")

import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaForCausalLM, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from decomp.decomposition import measure_step  # noqa: E402
from decomp.integrations.trl import (  # noqa: E402
    TRL_TESTED_RANGE,
    InstrumentConfig,
    MTPConfig,
    MTPGRPOTrainer,
    MTPModelView,
    check_trl_version,
    completion_mtp_logprobs,
    plain_forward,
    rollout_batch,
    trl_rl_loss,
)
from decomp.integrations.trl.heldout import heldout_batch, heldout_inputs  # noqa: E402
from decomp.models.hf import norms_in_float64  # noqa: E402
from decomp.objectives import (  # noqa: E402
    aligned_logprobs,  # noqa: E402
    model_logprobs,
    objectives,
)
from decomp.occ import masked_coefficient  # noqa: E402
from decomp.runlog import SCHEMA_VERSION, read_jsonl  # noqa: E402
from decomp.training.cli import main as cli_main  # noqa: E402
from decomp.training.texttasks import make_text_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def digit_reward(completions, **kwargs):
    """Dense: the fraction of digits in the completion (a random model earns some)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def dataset() -> Dataset:
    task = make_text_task("add1")
    return Dataset.from_list([{"prompt": p.question, "answer": p.answer} for p in task.train])


def heldout_rows() -> list[dict]:
    """The add1 task's held-out problems, in the training dataset's format."""
    return [{"prompt": p.question, "answer": p.answer} for p in make_text_task("add1").held_out]


def make_trainer(tiny_checkpoint: Path, out: Path, mtp: MTPConfig, decomp_every: int = 0,
                 instrument: InstrumentConfig | None = None, heldout_prompts=None, decomp_overwrite: bool = False,
                 **overrides) -> MTPGRPOTrainer:
    from transformers import AutoTokenizer

    instrument = InstrumentConfig(decomp_every=decomp_every) if instrument is None else instrument
    options = dict(output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=8, num_generations=4,
                   max_completion_length=6, max_steps=3, logging_steps=1, num_iterations=2, learning_rate=1e-3,
                   save_strategy="no", seed=0, bf16=False, max_grad_norm=0.0, disable_tqdm=True)
    options.update(overrides)
    lm = LlamaForCausalLM.from_pretrained(tiny_checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MTPGRPOTrainer(model=lm, reward_funcs=digit_reward, args=GRPOConfig(**options),
                              train_dataset=dataset(), processing_class=AutoTokenizer.from_pretrained(tiny_checkpoint),
                              mtp_config=mtp, instrument_config=instrument, heldout_prompts=heldout_prompts,
                              decomp_overwrite=decomp_overwrite)


def train_quietly(trainer: MTPGRPOTrainer, **train_args) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(**train_args)


def fake_inputs(lm, *, B: int = 4, P: int = 5, C: int = 6, seed: int = 0, with_old: bool = True) -> dict:
    """A TRL-shaped micro-batch: left-padded prompts, right-padded completions, advantages, ℓ^old."""
    gen = torch.Generator().manual_seed(seed)
    V = lm.config.vocab_size
    prompt_ids = torch.randint(4, V, (B, P), generator=gen)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    prompt_ids[0, :2] = 0
    completion_ids = torch.randint(4, V, (B, C), generator=gen)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 4:] = 0  # a completion that ended early
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": torch.randn(B, generator=gen),
        "num_items_in_batch": completion_mask.sum(),
    }
    if with_old:
        view = MTPModelView(lm)
        with torch.no_grad():
            logp, _, _ = model_logprobs(view, dict(view.named_parameters()), torch.cat([prompt_ids, completion_ids], 1),
                                        attention_mask=torch.cat([prompt_mask, completion_mask], 1), with_mtp=False)
        inputs["old_per_token_logps"] = logp[:, P - 1 :] + 0.05 * torch.randn(B, C, generator=gen)
    return inputs


def test_version_outside_the_tested_range_warns_naming_it():
    with pytest.warns(UserWarning, match=r"trl>=1\.16,<1\.17"):
        check_trl_version("1.15.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_trl_version("1.16.0")
    assert TRL_TESTED_RANGE == ">=1.16,<1.17"


def test_bad_config_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown regime 'mtp'"):
        MTPConfig(regime="mtp").validate()
    with pytest.raises(ValueError, match="directions must be a comma-separated subset"):
        InstrumentConfig(decomp_directions="active,sideways").validate()


def _occ_warnings(tiny_checkpoint, tmp_path, **args) -> list[str]:
    from transformers import AutoTokenizer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MTPGRPOTrainer(model=LlamaForCausalLM.from_pretrained(tiny_checkpoint), reward_funcs=digit_reward,
                       args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], num_generations=4,
                                       per_device_train_batch_size=4, **args),
                       train_dataset=dataset(), processing_class=AutoTokenizer.from_pretrained(tiny_checkpoint),
                       mtp_config=MTPConfig(regime="occ"))
    return [str(w.message) for w in caught if "OCC proxy and λ are 0" in str(w.message)]


@pytest.mark.parametrize("args,warned", [
    ({"num_iterations": 1}, True),
    ({"num_iterations": 2}, False),
    ({"num_iterations": 2, "gradient_accumulation_steps": 2, "steps_per_generation": 1}, True),  # one optimizer step
    ({"num_iterations": 1, "gradient_accumulation_steps": 3, "steps_per_generation": 2}, False),
])
def test_occ_warns_exactly_when_trl_keeps_no_old_log_probs(tiny_checkpoint, tmp_path, args, warned):
    assert bool(_occ_warnings(tiny_checkpoint, tmp_path, **args)) == warned


def test_settings_the_mtp_term_cannot_follow_are_refused(tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer, GraniteConfig, GraniteForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    granite = GraniteForCausalLM(GraniteConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               logits_scaling=4.0))
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], num_generations=4, per_device_train_batch_size=4,
                num_iterations=2)
    cases = [
        (granite, {}, MTPConfig(), "logits_scaling=4.0"),
        (LlamaForCausalLM.from_pretrained(tiny_checkpoint), {"loss_type": "cispo"}, MTPConfig(regime="policy"),
         "loss_type='cispo' has no such range"),
        (LlamaForCausalLM.from_pretrained(tiny_checkpoint), {"ddp_find_unused_parameters": True}, MTPConfig(),
         "ddp_find_unused_parameters=False"),
    ]
    for model, args, mtp, message in cases:
        with pytest.raises(ValueError, match=message), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            MTPGRPOTrainer(model=model, reward_funcs=digit_reward, args=GRPOConfig(**base, **args),
                           train_dataset=dataset(), processing_class=tok, mtp_config=mtp)


def test_the_callers_grpo_config_is_copied_not_modified(tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    config = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], num_generations=4,
                        per_device_train_batch_size=4, num_iterations=2, seed=7)
    assert config.ddp_find_unused_parameters is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_name = MTPGRPOTrainer(model=LlamaForCausalLM.from_pretrained(tiny_checkpoint), reward_funcs=digit_reward,
                                 args=config, train_dataset=dataset(), processing_class=tok)
        # GRPOTrainer(model, reward_funcs, args, ...): the config as the third positional argument
        positional = MTPGRPOTrainer(LlamaForCausalLM.from_pretrained(tiny_checkpoint), digit_reward, config,
                                    dataset(), processing_class=tok, mtp_config=MTPConfig(regime="ce"))
    assert config.ddp_find_unused_parameters is None  # the caller's object is untouched
    for trainer in (by_name, positional):
        assert trainer.args is not config and trainer.args.ddp_find_unused_parameters is False
        assert trainer.args.seed == 7 and trainer.args.output_dir == str(tmp_path)
    assert positional.regime.name == "ce" and hasattr(positional.model, "decomp_mtp")


def test_without_a_grpo_config_trls_default_gets_the_ddp_setting(tiny_checkpoint, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.chdir(tmp_path)  # TRL's default output_dir is relative: "<model name>-GRPO"
    # TRL's default config asks for bf16, which TrainingArguments refuses on a machine without a
    # bf16 GPU; pretend there is one (the trainer still runs on the CPU)
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    lm = LlamaForCausalLM.from_pretrained(tiny_checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(lm, digit_reward, train_dataset=dataset(),
                                 processing_class=AutoTokenizer.from_pretrained(tiny_checkpoint))
    assert trainer.args.ddp_find_unused_parameters is False
    assert trainer.args.output_dir.endswith(f"{Path(lm.config._name_or_path).name}-GRPO")


@pytest.mark.parametrize("regime", ["detach", "detach-inputs", "ce", "policy", "occ"])
def test_each_regime_trains_three_steps(tiny_checkpoint, tmp_path, regime):
    trainer = make_trainer(tiny_checkpoint, tmp_path, MTPConfig(regime=regime))
    mtp_before = {k: v.detach().clone() for k, v in trainer.model.decomp_mtp.named_parameters()}
    train_quietly(trainer)
    assert trainer.state.global_step == 3
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["mtp_loss"]) and m["regime"] == regime for m in metrics)
    changed = [k for k, v in trainer.model.decomp_mtp.named_parameters() if not torch.equal(v, mtp_before[k])]
    assert changed, "the MTP module did not learn"
    logged = [h for h in trainer.state.log_history if "mtp/coef" in h]
    assert len(logged) == 3
    coefs = [m["mtp_coef"] for m in metrics]
    if regime == "occ":
        # second update on each generation batch: ℓ ≠ ℓ^old, so the proxy has signal
        assert coefs[1] != 0.0
    else:
        assert coefs == [0.1, 0.1, 0.1]


@pytest.mark.parametrize("regime", ["detach", "detach-inputs", "ce", "policy", "occ"])
def test_mtp_loss_reaches_shared_parameters_only_as_design_says(tiny_checkpoint, tmp_path, regime):
    trainer = make_trainer(tiny_checkpoint, tmp_path, MTPConfig(regime=regime))
    lm = trainer.model
    inputs = fake_inputs(lm)
    tokens = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    hidden = lm.base_model(input_ids=tokens, attention_mask=mask).last_hidden_state
    logp = inputs["old_per_token_logps"] + 0.01  # any current log-probs
    lm.zero_grad(set_to_none=True)
    term, _ = trainer._mtp_term(lm, inputs, hidden, logp)
    term.unit_loss.backward()
    grads = {n: p.grad for n, p in lm.named_parameters()}

    def reached(name: str) -> bool:
        g = grads[name]
        return g is not None and bool(g.abs().sum() > 0)

    assert reached("decomp_mtp.0.proj.weight") and reached("decomp_mtp.0.block.mlp.down_proj.weight")
    trunk = [n for n in grads if n.startswith("model.layers.") or n == "model.norm.weight"]
    embedding = "model.embed_tokens.weight"  # tied: also the output head
    if regime == "detach":
        assert not any(reached(n) for n in grads if not n.startswith("decomp_mtp."))
    elif regime == "detach-inputs":
        assert reached(embedding) and not any(reached(n) for n in trunk)
    else:
        assert reached(embedding) and all(reached(n) for n in trunk if "layers.1." in n)


def test_mtp_log_probs_align_with_decomps_aligned_axis(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, MTPConfig(regime="ce", mtp_depth=2))
    lm = trainer.model.double()
    P = 2  # shorter than depth + 1: depth 2 has no prediction for the first completion token
    inputs = fake_inputs(lm, P=P, with_old=False)
    tokens = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad(), norms_in_float64(lm):  # float64 throughout, as the view evaluates a float64 model
        hidden = lm.base_model(input_ids=tokens, attention_mask=mask).last_hidden_state
        got, valid = completion_mtp_logprobs(lm, hidden, inputs, "none")
        main, mtp = MTPModelView(lm)(tokens, attention_mask=mask)
    _, want, want_valid = aligned_logprobs(main, mtp, tokens)
    for k in range(2):
        torch.testing.assert_close(got[k], want[k][:, P - 1 :], rtol=0, atol=1e-10)
        assert torch.equal(valid[k], want_valid[k][:, P - 1 :])
    assert valid[1][:, 0].logical_not().all() and valid[1][:, 1:].all() and valid[0].all()


LOSS_CASES = [  # loss_type, beta, bias-corrected KL, gradient accumulation, tool mask
    ("dapo", 0.0, False, 1, False), ("grpo", 0.04, False, 1, False), ("bnpo", 0.0, False, 1, False),
    ("dr_grpo", 0.0, False, 1, False), ("cispo", 0.0, False, 1, False), ("luspo", 0.0, False, 1, False),
    ("grpo", 0.04, True, 2, True), ("dapo", 0.0, False, 3, True),
]


@pytest.mark.parametrize("loss_type,beta,bias_kl,accum,tool_mask", LOSS_CASES)
def test_rl_loss_reproduces_trls_loss_and_gradient(tiny_checkpoint, tmp_path, loss_type, beta, bias_kl, accum, tool_mask):
    trainer = make_trainer(tiny_checkpoint, tmp_path, MTPConfig(regime="detach"), loss_type=loss_type, beta=beta,
                           epsilon_high=0.28, delta=1.5 if loss_type == "grpo" else None,
                           use_bias_correction_kl=bias_kl, gradient_accumulation_steps=accum)
    trainer.current_gradient_accumulation_steps = accum
    lm = trainer.model
    inputs = fake_inputs(lm, seed=3)
    old = inputs["old_per_token_logps"]
    if beta:
        inputs["ref_per_token_logps"] = old - 0.1
    if tool_mask:
        inputs["tool_mask"] = torch.ones_like(inputs["completion_mask"])
        inputs["tool_mask"][2, 1:3] = 0  # tool output inside a completion: not trained on
    if loss_type == "dapo":
        inputs["num_items_in_batch"] = inputs["num_items_in_batch"] * 3  # spans a larger generation batch
    # TRL's own loss (the base class: no MTP term) and its gradient, in training mode
    lm.train()
    lm.zero_grad(set_to_none=True)
    trl_loss = GRPOTrainer._compute_loss(trainer, lm, inputs)
    trl_loss.backward()
    shared = {n: p for n, p in lm.named_parameters() if not n.startswith("decomp_mtp.")}
    want = {n: p.grad.clone() * accum for n, p in shared.items()}  # ours: a step of this micro-batch alone
    # ours, a function of decomp's aligned log-probs through the view
    view = MTPModelView(lm)
    batch = rollout_batch(inputs)
    loss_fn = trl_rl_loss(trainer, inputs, old)

    def ours(params):
        logp, _, _ = model_logprobs(view, params, batch.tokens, attention_mask=batch.attention_mask, with_mtp=False)
        return loss_fn(logp)

    params = {k: v.detach() for k, v in view.named_parameters()}
    with plain_forward(lm):
        value = ours(params)
        grads = torch.func.grad(ours)(params)
    torch.testing.assert_close(value, trl_loss.detach() * accum, rtol=1e-5, atol=1e-7)
    for n, g in want.items():
        torch.testing.assert_close(grads["lm." + n], g, rtol=1e-4, atol=1e-6)


def test_rl_loss_kl_stays_finite_at_padding_as_trls(tiny_checkpoint, tmp_path):
    """TRL's log-probs are 0 at padding; a very negative ℓ there must not overflow exp(ref − ℓ)."""
    trainer = make_trainer(tiny_checkpoint, tmp_path, MTPConfig(regime="detach"), beta=0.04)
    trainer.current_gradient_accumulation_steps = 1
    inputs = fake_inputs(trainer.model, seed=4)
    old = inputs["old_per_token_logps"] * inputs["completion_mask"]  # TRL: 0 at padding
    inputs["ref_per_token_logps"] = old.clone()
    P = inputs["prompt_ids"].shape[1]
    logp = torch.zeros(old.shape[0], P - 1 + old.shape[1])
    logp[:, P - 1 :] = old
    loss_fn = trl_rl_loss(trainer, inputs, old)
    padded = logp.clone()
    padded[:, P - 1 :][inputs["completion_mask"] == 0] = -200.0  # the view's ℓ at a padded position
    assert math.isfinite(float(loss_fn(padded))) and float(loss_fn(padded)) == float(loss_fn(logp))


class _Check(TrainerCallback):
    """Before each optimizer step, a measurement; after it, the real update (for the tests)."""

    def __init__(self, trainer: MTPGRPOTrainer) -> None:
        self.trainer = trainer
        self.coefs: list[tuple[float, float]] = []
        self.updates: list[tuple[float, float]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        tr = self.trainer
        micro = tr.last_micro_batch
        inputs, lm = micro["inputs"], tr.model
        view = MTPModelView(lm, tr.temperature)
        batch = rollout_batch(inputs, micro["logp"])
        params = {k: v.detach() for k, v in view.named_parameters()}
        with torch.no_grad(), plain_forward(lm):
            logp, mtp_logp, valid = model_logprobs(view, params, batch.tokens, attention_mask=batch.attention_mask)
        r = batch.response
        # an independent OCC estimate: decomp.occ on log-probs from the unfused view
        lam = float(masked_coefficient(r(mtp_logp[0]), r(logp), r(batch.old_logp), r(batch.mask & valid[0]),
                                               tr.mtp_config.mtp_scale))
        t = micro["tensors"]  # the very tensors the trainer used
        same = float(masked_coefficient(t["mtp_logp"][0], t["logp"], t["old_logp"], t["mask"][0],
                                                tr.mtp_config.mtp_scale))
        self.coefs.append((lam, same, float(micro["coef"])))
        obj = objectives(view, batch, tr.regime, coef=float(micro["coef"]),
                         rl_loss_of_logp=trl_rl_loss(tr, inputs, r(batch.old_logp)))
        named = dict(view.named_parameters())
        with plain_forward(lm):
            measured = measure_step(obj.rl_objective, obj.mtp_loss, named, coef=float(micro["coef"]),
                                    optimizer=tr.optimizer.optimizer, rl_loss=obj.rl_loss)
        self._before = params_clone = {k: v.detach().clone() for k, v in named.items()}
        self._predicted = {k: measured.updates.update_rl[k] + measured.updates.displacement[k] for k in params_clone}

    def on_optimizer_step(self, args, state, control, **kwargs):
        real = {k: v.detach() - self._before[k] for k, v in MTPModelView(self.trainer.model).named_parameters()}
        diff = sum(float((real[k] - self._predicted[k]).pow(2).sum()) for k in real) ** 0.5
        norm = sum(float(real[k].pow(2).sum()) for k in real) ** 0.5
        self.updates.append((diff, norm))


@pytest.mark.parametrize("regime,loss_type,decomp_every", [("occ", "dapo", 1), ("ce", "grpo", 0)])
def test_counterfactual_step_is_the_real_step_and_occ_is_decomps(tiny_checkpoint, tmp_path, regime, loss_type,
                                                                  decomp_every):
    """Also with the decomposition callback running before the check: measuring leaves the step alone."""
    trainer = make_trainer(tiny_checkpoint, tmp_path, MTPConfig(regime=regime), decomp_every=decomp_every,
                           loss_type=loss_type, max_steps=2)
    check = _Check(trainer)
    trainer.add_callback(check)
    train_quietly(trainer)
    assert len(check.updates) == 2
    for diff, norm in check.updates:
        assert norm > 0 and diff <= 1e-4 * norm, (diff, norm)
    if regime == "occ":
        assert check.coefs[1][2] != 0.0
        for independent, same, applied in check.coefs:
            assert applied == pytest.approx(same, rel=1e-6, abs=1e-12)
            # recomputed through the unfused view: float32 rounding of ℓ (~1e-7) is the only difference
            assert applied == pytest.approx(independent, rel=1e-4, abs=1e-6)


def test_callback_logs_and_writes_records_the_analysis_reads(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    trainer = make_trainer(tiny_checkpoint, out, MTPConfig(regime="detach"), decomp_every=1, max_steps=2)
    train_quietly(trainer)
    records = read_jsonl(out / "decomposition.jsonl")
    assert sorted({(r["step"], r["direction"]) for r in records}) == [
        (s, d) for s in (1, 2) for d in ("active", "ce", "distill-joint", "policy")
    ]
    active = [r for r in records if r["direction"] == "active"]
    assert all(r["correlation"] == 0.0 and r["penalty"] == 0.0 and r["cross"] == 0.0 for r in active)
    ce = [r for r in records if r["direction"] == "ce"]
    assert all(r["displacement_norm"] > 0 and r["optimizer"] == "adamw" for r in ce)
    logged = [h for h in trainer.state.log_history if "decomp/lambda_star" in h or "decomp/correlation" in h]
    assert len(logged) == 2 and all("decomp/ce/penalty" in h and "decomp/coef_masked" in h for h in logged)
    run = json.loads((out / "decomp_run.json").read_text())
    assert run["config"]["regime"] == "detach" and run["schema_version"] == SCHEMA_VERSION
    assert cli_main(["plot", str(out), "--out", str(tmp_path / "figures")]) == 0
    assert cli_main(["validate", str(out), "--out", str(tmp_path / "validation.json")]) == 0
    assert (tmp_path / "figures" / "terms_active.png").is_file()
    assert json.loads((tmp_path / "validation.json").read_text())


def test_heldout_prompts_add_a_heldout_split_sharing_the_updates(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    trainer = make_trainer(tiny_checkpoint, out, MTPConfig(regime="policy"), decomp_every=1, max_steps=2,
                           heldout_prompts=Dataset.from_list(heldout_rows()))  # a Dataset; lists elsewhere
    train_quietly(trainer)
    records = read_jsonl(out / "decomposition.jsonl")
    keys = [(r["step"], r["direction"], r["split"]) for r in records]
    assert sorted(keys) == [(s, d, sp) for s in (1, 2) for d in ("active", "ce", "distill-joint", "policy") for sp in ("heldout", "train")]
    by_key = {k: r for k, r in zip(keys, records, strict=True)}
    for step in (1, 2):
        for direction in ("active", "ce", "policy"):
            train, held = by_key[(step, direction, "train")], by_key[(step, direction, "heldout")]
            # the updates come from the training micro-batch: one displacement, two judges
            assert held["displacement_norm"] == train["displacement_norm"] > 0
            assert held["update_norm_rl"] == train["update_norm_rl"]
            assert held["rl_objective"] != train["rl_objective"]  # another batch
    assert all("lambda_hat_reason" in r and "lambda_hat" in r for r in records)
    assert json.loads((out / "decomp_run.json").read_text())["config"]["heldout"] is True
    logged = [h for h in trainer.state.log_history if "decomp/realized" in h]
    assert len(logged) == 2 and all("decomp/heldout/realized" in h and "decomp/ce/heldout/penalty" in h for h in logged)


def test_without_heldout_prompts_there_is_only_the_train_split_with_its_optimum(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    trainer = make_trainer(tiny_checkpoint, out, MTPConfig(regime="ce"), max_steps=1,
                           instrument=InstrumentConfig(decomp_every=1, decomp_directions="active"))
    train_quietly(trainer)
    records = read_jsonl(out / "decomposition.jsonl")
    assert [(r["direction"], r["split"]) for r in records] == [("active", "train")]
    assert "lambda_hat_reason" in records[0] and "lambda_hat" in records[0]
    assert json.loads((out / "decomp_run.json").read_text())["config"]["heldout"] is False


# what a run logs that is not decomp's nor a wall-clock time
TIMINGS = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def _training_trace(trainer: MTPGRPOTrainer, out: Path) -> tuple[list[dict], list[dict], dict[str, torch.Tensor]]:
    logs = [{k: v for k, v in h.items() if not k.startswith("decomp/") and k not in TIMINGS}
            for h in trainer.state.log_history]
    metrics = [{k: v for k, v in m.items() if k != "decomp_seconds"} for m in read_jsonl(out / "metrics.jsonl")]
    return logs, metrics, {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def test_the_heldout_split_leaves_training_bit_identical(tiny_checkpoint, tmp_path):
    """Same seed, decomposition at every step in both: with and without the held-out batch,
    every training log, metric and final parameter is the same bit for bit (3 steps: the third
    generates after two held-out batches were sampled)."""
    traces = []
    for name, heldout in (("with", heldout_rows()), ("without", None)):
        trainer = make_trainer(tiny_checkpoint, tmp_path / name, MTPConfig(regime="occ"), decomp_every=1,
                               heldout_prompts=heldout,
                               instrument=InstrumentConfig(decomp_every=1, decomp_directions="active"))
        train_quietly(trainer)
        traces.append(_training_trace(trainer, tmp_path / name))
    (logs_a, metrics_a, params_a), (logs_b, metrics_b, params_b) = traces
    assert len(logs_a) == 4 and "mtp/coef" in logs_a[0] and "reward" in logs_a[0] and "loss" in logs_a[0]
    assert logs_a == logs_b and metrics_a == metrics_b
    assert params_a.keys() == params_b.keys() and all(torch.equal(params_a[k], params_b[k]) for k in params_a)
    splits = {r["split"] for r in read_jsonl(tmp_path / "with" / "decomposition.jsonl")}
    assert splits == {"train", "heldout"}


def test_heldout_batch_is_reproducible_and_leaves_the_rng_and_logs_alone(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, MTPConfig(regime="ce"), heldout_prompts=heldout_rows())
    lm, G = trainer.model, trainer.num_generations
    view = MTPModelView(lm, trainer.temperature)
    torch.manual_seed(123)
    state, tokens_seen = torch.get_rng_state(), trainer.state.num_input_tokens_seen
    with plain_forward(lm):
        batch = heldout_batch(trainer, view, step=1, size=6)  # not a multiple of G: 2 groups, cut to 6
        again = heldout_batch(trainer, view, step=1, size=6)
        other = heldout_inputs(trainer, lm, step=2, size=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert trainer.state.num_input_tokens_seen == tokens_seen and not any(trainer._metrics["train"].values())
    assert batch.tokens.shape[0] == 6 and torch.equal(batch.tokens, again.tokens)
    assert not torch.equal(other["prompt_ids"][:6], batch.tokens[:, : other["prompt_ids"].shape[1]])
    # the current policy's log-probs: J at the current θ is at ratio 1
    params = {k: v.detach() for k, v in view.named_parameters()}
    with torch.no_grad(), plain_forward(lm):
        logp, _, _ = model_logprobs(view, params, batch.tokens, attention_mask=batch.attention_mask, with_mtp=False)
    assert torch.equal(logp[batch.mask], batch.old_logp[batch.mask])
    # TRL's group-normalised advantages: zero mean per whole group (here the first)
    adv = other["advantages"]
    assert adv.shape == (8,) and abs(float(adv[:G].mean())) < 1e-5 and bool(adv.abs().sum() > 0)
    # TRL's completion mask: ones up to and including the first EOS
    eos = trainer.eos_token_ids[0]
    for ids, mask in zip(other["completion_ids"], other["completion_mask"], strict=True):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any() and (n == len(ids) or int(ids[n - 1]) == eos)


def test_bad_heldout_prompts_are_refused(tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    for bad, message in (([], "heldout_prompts is empty"), ([{"question": "1+1?"}], "heldout_prompts: rows"),
                         (Dataset.from_list([{"question": "1+1?"}]), "heldout_prompts has no 'prompt' column"),
                         (Dataset.from_list([{"prompt": "x"}]).select([]), "heldout_prompts is empty")):
        with pytest.raises(ValueError, match=message):
            make_trainer(tiny_checkpoint, tmp_path, MTPConfig(), heldout_prompts=bad)
    reward_model = LlamaForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=1)
    with pytest.raises(ValueError, match="heldout_prompts: .*reward model"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MTPGRPOTrainer(model=LlamaForCausalLM.from_pretrained(tiny_checkpoint), reward_funcs=[digit_reward, reward_model],
                       args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], num_generations=4,
                                       per_device_train_batch_size=4),
                       train_dataset=dataset(), processing_class=AutoTokenizer.from_pretrained(tiny_checkpoint),
                       heldout_prompts=heldout_rows())


class _Bar:
    """Stands in for tqdm in the callback: records what the progress bar is told."""

    made: list[_Bar] = []

    def __init__(self, total=None, disable=False, **kwargs):
        self.total, self.disable, self.n, self.postfixes, self.closed = total, disable, 0, [], False
        _Bar.made.append(self)

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, text, refresh=True):
        self.postfixes.append(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed = True


@pytest.mark.parametrize("disable", [False, True])
def test_progress_bar_advances_once_per_record_showing_each(tiny_checkpoint, tmp_path, monkeypatch, disable):
    import decomp.integrations.trl.callback as callback

    monkeypatch.setattr(callback, "tqdm", _Bar)
    _Bar.made = []
    out = tmp_path / "run"
    trainer = make_trainer(tiny_checkpoint, out, MTPConfig(regime="ce"), max_steps=2, heldout_prompts=heldout_rows(),
                           instrument=InstrumentConfig(decomp_every=1, decomp_directions="active,ce,policy"),
                           disable_tqdm=disable)
    train_quietly(trainer)
    records = read_jsonl(out / "decomposition.jsonl")
    assert len(_Bar.made) == 2 and all(b.total == 6 == b.n and b.closed for b in _Bar.made)  # 3 directions × 2 splits
    assert all(b.disable is disable for b in _Bar.made)
    shown = [p for b in _Bar.made for p in b.postfixes]
    assert len(shown) == len(records) == 12
    for text, record in zip(shown, records, strict=True):
        assert text.startswith(f"{record['direction']}/{record['split']}") and text.endswith(" s")
    assert any("= active" in t for t in shown)  # the shadow ce direction of a ce run is a copy


def test_hugging_face_defaults_measure_the_active_direction_on_heldout_rollouts_first(tiny_checkpoint, tmp_path):
    from decomp.integrations.trl import HF_DIRECTIONS, hf_instrument_config

    cfg = hf_instrument_config(heldout=True)
    assert HF_DIRECTIONS == "active" and cfg.directions == ("active",) and cfg.decomp_every == 5
    assert cfg.heldout and cfg.searched_splits == ("heldout",)
    assert hf_instrument_config(2).searched_splits == ("train",) and not hf_instrument_config(2).heldout
    assert hf_instrument_config(heldout=True, search=False).searched_splits == ()
    assert hf_instrument_config(shadow=True).directions == ("active", "ce", "policy", "distill-joint")
    assert hf_instrument_config(decomp_directions="active,ce", search_splits="train,heldout").directions == ("active", "ce")
    with pytest.raises(ValueError, match="directions must be"):
        hf_instrument_config(decomp_directions="sideways")
    out = tmp_path / "run"
    trainer = make_trainer(tiny_checkpoint, out, MTPConfig(regime="policy"), max_steps=1, heldout_prompts=heldout_rows(),
                           instrument=hf_instrument_config(1, heldout=True))
    train_quietly(trainer)
    records = read_jsonl(out / "decomposition.jsonl")
    assert [(r["direction"], r["split"]) for r in records] == [("active", "train"), ("active", "heldout")]
    train, held = records
    assert train["search_seconds"] == 0.0 and held["search_seconds"] > 0 and "lambda_hat" in held
    assert math.isfinite(held["gain_masked"]) and not math.isfinite(train["gain_masked"])


def test_example_defaults_and_help_state_the_opt_in_shadow_directions():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "trl_grpo.py"), "--help"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())
    assert "--directions" in text and "default: active only" in text and "opt-in" in text
    assert "default: heldout with --heldout, else train" in text


def test_decomposition_refuses_a_loss_it_cannot_reproduce(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, MTPConfig(regime="ce"), decomp_every=1, loss_type="sapo")
    with pytest.raises(ValueError, match="loss_type='sapo'"):
        train_quietly(trainer)


def test_example_script_trains_a_local_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "example"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "trl_grpo.py"), "--model", str(tiny_checkpoint), "--regime", "occ",
         "--steps", "2", "--decomp-every", "2", "--batch-size", "8", "--num-generations", "4",
         "--max-completion-length", "6", "--output-dir", str(out), "--heldout",
         "--directions", "active,ce,policy,distill-joint"],  # the shadow directions are opt-in
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_jsonl(out / "metrics.jsonl")) == 2
    records = read_jsonl(out / "decomposition.jsonl")
    # conversational prompts (the example's chat format) on both splits
    assert {(r["direction"], r["split"]) for r in records} == {
        (d, s) for d in ("active", "ce", "distill-joint", "policy") for s in ("train", "heldout")}


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["checkpointing", "plain"])
def test_two_process_ddp_applies_the_union_occ_estimate_on_every_rank(tiny_checkpoint, tmp_path, checkpointing):
    """torchrun, 2 CPU processes (gloo): the OCC sums are all-reduced, the decomposition runs on
    rank 0 only and nobody deadlocks, with activation checkpointing on or off (off, transformers
    would have DDP look for unused parameters, and the MTP modules' gradients would then break it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    crashes = []
    for _ in range(2):  # one more try after a crashed rank: seen about once in 100 runs, not an assertion
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(ROOT / "tests" / "scripts" / "trl_ddp_occ.py"), str(tiny_checkpoint), str(tmp_path), checkpointing],
            capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
        )
        if proc.returncode == 0 or "AssertionError" in proc.stderr:
            break
        crashes.append(proc.stderr[-1500:])
    assert proc.returncode == 0, "\n---\n".join([*crashes, proc.stderr[-3000:]])
    assert json.loads((tmp_path / "decomp_run.json").read_text())["config"]["num_processes"] == 2
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [row["step"] for row in ranks[0]] == [1, 2] == [row["step"] for row in ranks[1]]
    for rows in zip(*ranks, strict=True):
        ratio_sum = sum(float((r["mask"] * (r["a"] * r["b"] / (r["a"] ** 2 + 1e-8))).double().sum()) for r in rows)
        count = sum(float(r["mask"].sum()) for r in rows)
        union = 0.1 * ratio_sum / count
        assert rows[0]["coef"] == rows[1]["coef"] == pytest.approx(union, rel=1e-6, abs=1e-12)
    second = [float((r["mask"] * (r["a"] * r["b"] / (r["a"] ** 2 + 1e-8))).sum() / r["mask"].sum()) for r in
              (ranks[0][1], ranks[1][1])]
    assert second[0] != pytest.approx(second[1], rel=1e-3)  # the ranks' own estimates differ: the test has power
    records = read_jsonl(tmp_path / "decomposition.jsonl")
    # written once, by rank 0, held-out split included (sampled on rank 0 alone: no collective)
    assert sorted((r["step"], r["direction"], r["split"]) for r in records) == [
        (2, d, s) for d in ("active", "ce", "distill-joint", "policy") for s in ("heldout", "train")]


@pytest.mark.parametrize("mtp,match", [
    (MTPConfig(regime="oracle"), "not supported inside TRL"),
    (MTPConfig(regime="cosine"), "not supported inside TRL"),
    (MTPConfig(regime="occ-split"), "not supported inside TRL"),
    (MTPConfig(regime="occ", occ_control="random_sign"), "occ_control=random_sign is not supported inside TRL"),
    (MTPConfig(regime="occ", occ_estimator="trust_region"), "needs the step's updates"),
])
def test_regimes_the_trl_integration_does_not_run_are_refused(tiny_checkpoint, tmp_path, mtp, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tiny_checkpoint, tmp_path, mtp)


# the run directory: a new run never erases records, a resume never mixes two runs' records

RUN_FILES = ("decomp_run.json", "metrics.jsonl", "decomposition.jsonl")


def _files(out: Path) -> dict[str, bytes | None]:
    return {name: (out / name).read_bytes() if (out / name).exists() else None for name in RUN_FILES}


def _begin(trainer: MTPGRPOTrainer, step: int) -> None:
    """The callback's train begin and end, without training, on a state at ``step`` (> 0: a
    resume from that checkpoint step, as TRL restores ``global_step`` before calling it)."""
    callback, state = trainer.decomposition_callback, SimpleNamespace(global_step=step)
    callback.on_train_begin(trainer.args, state, None)
    callback.on_train_end(trainer.args, state, None)


def test_a_new_run_never_erases_an_earlier_runs_records_unless_told(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    train_quietly(make_trainer(tiny_checkpoint, out, MTPConfig(regime="ce"), max_steps=2))
    before = _files(out)
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    with pytest.raises(ValueError, match=r"already holds the decomp records of another run \(decomp_run\.json, "
                       r"metrics\.jsonl, decomposition\.jsonl\).*another decomp_dir.*decomp_overwrite=True") as err:
        train_quietly(make_trainer(tiny_checkpoint, out, MTPConfig(regime="detach"), max_steps=1))
    assert "\n" not in str(err.value)
    assert _files(out) == before  # refused before touching anything
    train_quietly(make_trainer(tiny_checkpoint, out, MTPConfig(regime="detach"), max_steps=1, decomp_overwrite=True))
    assert [(m["step"], m["regime"]) for m in read_jsonl(out / "metrics.jsonl")] == [(1, "detach")]
    assert json.loads((out / "decomp_run.json").read_text())["config"]["regime"] == "detach"


def test_a_resume_keeps_the_records_up_to_its_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    instrument = InstrumentConfig(decomp_every=1, decomp_directions="active", search=False)
    options = dict(instrument=instrument, max_steps=3, save_strategy="steps", save_steps=2)
    train_quietly(make_trainer(tiny_checkpoint, out, MTPConfig(regime="ce"), **options))
    run = (out / "decomp_run.json").read_text()
    first = {name: read_jsonl(out / name) for name in ("metrics.jsonl", "decomposition.jsonl")}
    assert [r["step"] for r in first["decomposition.jsonl"]] == [1, 2, 3]
    resumed = make_trainer(tiny_checkpoint, out, MTPConfig(regime="ce"), **options)
    train_quietly(resumed, resume_from_checkpoint=str(out / "checkpoint-2"))
    assert resumed.state.global_step == 3
    for name, records in first.items():
        again = read_jsonl(out / name)
        assert [r["step"] for r in again] == [1, 2, 3]  # step 3 dropped at the resume, then written anew
        assert again[:2] == records[:2]
    assert (out / "decomp_run.json").read_text() == run


def test_a_resume_with_other_settings_is_refused_naming_them(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    _begin(make_trainer(tiny_checkpoint, out, MTPConfig(regime="ce")), step=0)
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 3}\n')
    before = _files(out)
    other = make_trainer(tiny_checkpoint, out, MTPConfig(regime="ce", mtp_scale=0.2), learning_rate=2e-3)
    differences = r"\(saved vs this trainer: learning_rate: 0\.001 vs 0\.002; mtp_scale: 0\.1 vs 0\.2\)"
    with pytest.raises(ValueError, match=rf"cannot resume into .*decomp_run\.json has other settings {differences}; "
                       r".*decomp_overwrite=True") as err:
        _begin(other, step=2)
    assert "\n" not in str(err.value)
    assert _files(out) == before
    # another TRL version alone is the environment, not the run: allowed, with a warning, and recorded
    saved = json.loads((out / "decomp_run.json").read_text())
    saved["config"]["trl_version"] = "1.16.0.dev0"
    (out / "decomp_run.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=r"trl_version=.*the run started with '1\.16\.0\.dev0'"):
        _begin(make_trainer(tiny_checkpoint, out, MTPConfig(regime="ce")), step=2)
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1]  # truncated to the checkpoint
    assert json.loads((out / "decomp_run.json").read_text())["config"]["trl_version"] == trl.__version__


@pytest.mark.parametrize("text", ['{"config": {"regime": "ce"', "[1, 2]", '{"config": {}}', "\udcff", "[" * 100_000])
def test_a_corrupt_decomp_run_json_is_refused_with_the_way_out(tiny_checkpoint, tmp_path, text):
    out = tmp_path / "run"
    out.mkdir()
    (out / "decomp_run.json").write_text(text, errors="surrogateescape")  # "\udcff": a byte that is not UTF-8
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 3}\n')
    before = _files(out)
    trainer = make_trainer(tiny_checkpoint, out, MTPConfig())
    with pytest.raises(ValueError, match=r"decomp_run\.json .*; delete it, or pass decomp_overwrite=True") as err:
        _begin(trainer, step=2)
    assert "\n" not in str(err.value)
    assert _files(out) == before


def test_decomp_run_json_is_replaced_atomically(tiny_checkpoint, tmp_path, monkeypatch):
    """A run killed while rewriting decomp_run.json (at a resume) leaves the old file whole."""
    out = tmp_path / "run"
    trainer = make_trainer(tiny_checkpoint, out, MTPConfig())
    _begin(trainer, step=0)
    run = (out / "decomp_run.json").read_text()
    write_text = Path.write_text

    def killed_mid_write(self, text, *args, **kwargs):
        if '"schema_version"' not in text:
            return write_text(self, text, *args, **kwargs)
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("killed mid-write")

    monkeypatch.setattr(Path, "write_text", killed_mid_write)
    with pytest.raises(OSError, match="killed mid-write"):
        _begin(trainer, step=2)
    monkeypatch.undo()
    assert (out / "decomp_run.json").read_text() == run
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)  # no temporary file left behind


def test_the_callback_reads_the_trainer_through_its_interface_only(tiny_checkpoint, tmp_path):
    """The TRL modules import in one direction: the callback, installed by the trainer, knows it
    only as a MeasuredTrainer, and the trainer provides every member of that interface."""
    import ast
    import inspect as inspect_

    import decomp.integrations.trl.callback as callback
    from decomp.integrations.trl.interface import MeasuredTrainer

    imported = {n.module for n in ast.walk(ast.parse(inspect_.getsource(callback))) if isinstance(n, ast.ImportFrom)}
    assert "decomp.integrations.trl.trainer" not in imported
    assert "._metrics" not in inspect_.getsource(callback)
    trainer = make_trainer(tiny_checkpoint, tmp_path, MTPConfig(regime="ce"))
    members = set(MeasuredTrainer.__annotations__) | {n for n in vars(MeasuredTrainer) if not n.startswith("_")}
    assert members and all(hasattr(trainer, name) for name in members), sorted(m for m in members if not hasattr(trainer, m))
    trainer.log_metric("decomp/test", 2.5)
    assert trainer.last_logged("decomp/test") == 2.5 and trainer.last_logged("absent") is None


@pytest.mark.parametrize("setting", [{"group_errors": True}, {"heldout_groups": 16}, {"noise_ceiling": True}])
def test_settings_trl_cannot_honour_are_refused_before_the_trainer_is_built(setting):
    pytest.importorskip("trl")
    from decomp.config import InstrumentConfig
    from decomp.integrations.trl import MTPGRPOTrainer

    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"{name} is not supported inside TRL"):
        MTPGRPOTrainer(instrument_config=InstrumentConfig(**setting))
