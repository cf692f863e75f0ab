"""The ``heldout`` split of a TRL run: an independent micro-batch of rollouts from the current
policy, on which each decomposition's ``J`` side is evaluated beside the in-sample ``train`` one.

Built on the main process only (where the decomposition runs), so it reproduces what TRL's
``_generate_and_score_completions`` does for one micro-batch *without calling it*: that method
gathers rewards and lengths across processes (a deadlock when one rank calls it alone) and writes
TRL's metrics and ``state.num_input_tokens_seen``. Here, per instrumented step:

1. ``⌈B / G⌉`` prompts (``B`` the training micro-batch's sequences, ``G = num_generations``) drawn
   from ``heldout_prompts`` by a generator seeded from ``(args.seed, step)`` plus a fixed offset
   (its own stream: the training streams never see it);
2. each prompt repeated ``G`` times, tokenized as TRL tokenizes prompts (its chat template for
   conversational ones), left-padded, and completed by the unwrapped model's ``generate`` with
   TRL's generation config, under a forked RNG (CPU and the CUDA device in use) seeded from the
   held-out stream;
3. the completions cut after their first EOS as TRL cuts them, scored by the trainer's reward
   functions with TRL's calling convention, and given TRL's group-normalised advantages; then
   truncated to ``B`` sequences;
4. ``ℓ^old`` the current policy's log-probs of the completions (so ``J`` at the current ``θ`` is
   the importance objective at ratio 1).

Differences from a training micro-batch, by design: ``scale_rewards="batch"`` (and
``normalize_then_sum``'s final normalisation) use the held-out micro-batch's statistics, not the
whole generation batch's across processes; reward functions' ``log_extra``/``log_metric`` calls
are dropped, so training's logs are untouched.
"""

from __future__ import annotations

import asyncio
import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import transformers
from packaging.version import Version
from torch import Tensor, nn
from trl.trainer.utils import is_async_callable, nanstd, pad

from decomp.integrations.trl.align import MTPModelView, rollout_batch
from decomp.objectives import RolloutBatch, model_logprobs
from decomp.rng import HELDOUT_STREAM, seeded_fork, stream_seed

if TYPE_CHECKING:
    from decomp.integrations.trl.trainer import MTPGRPOTrainer

MULTIMODAL_COLUMNS = ("image", "images")


def check_heldout_prompts(data: Any) -> Sequence[dict[str, Any]]:
    """``heldout_prompts`` as an indexable sequence of rows (a ``datasets.Dataset`` or a list of
    dicts), or a ``ValueError`` naming it: empty, rows without a ``"prompt"``, or images (a
    ``TypeError`` for another kind of object)."""
    from datasets import Dataset

    if isinstance(data, Dataset):
        columns = list(data.column_names)
        if len(data) == 0:
            raise ValueError("heldout_prompts is empty: give at least one row with a 'prompt'")
        if "prompt" not in columns:
            raise ValueError(f"heldout_prompts has no 'prompt' column (columns: {', '.join(columns) or 'none'})")
        rows: Sequence[dict[str, Any]] = data
    elif isinstance(data, (list, tuple)):
        if not data:
            raise ValueError("heldout_prompts is empty: give at least one row with a 'prompt'")
        bad = [i for i, row in enumerate(data) if not isinstance(row, dict) or "prompt" not in row]
        if bad:
            raise ValueError(f"heldout_prompts: rows {bad[:5]} are not dicts with a 'prompt' (the train_dataset's "
                             "format: a 'prompt' column plus the columns the reward functions read)")
        columns = list(data[0])
        rows = list(data)
    else:
        raise TypeError(f"heldout_prompts must be a datasets.Dataset or a list of dict rows, got {type(data).__name__}")
    if any(c in columns for c in MULTIMODAL_COLUMNS):
        raise ValueError("heldout_prompts: multimodal rows (image columns) are not supported")
    return rows


def unsupported_heldout_settings(trainer: MTPGRPOTrainer) -> list[str]:
    """Trainer settings the held-out generation does not reproduce (empty: all supported).

    Reward models would need their own tokenization and device placement; tools, environments,
    custom rollout functions and vision processors change what a rollout is.
    """
    problems = []
    names = getattr(trainer, "reward_func_names", [None] * len(trainer.reward_funcs))
    for func, name in zip(trainer.reward_funcs, names, strict=True):
        if isinstance(func, nn.Module):
            problems.append(f"a reward model ({name or type(func).__name__}; use reward functions)")
    if getattr(trainer, "rollout_func", None) is not None:
        problems.append("rollout_func")
    if getattr(trainer, "tools", None):
        problems.append("tools")
    if getattr(trainer, "environment_factories", None) is not None:
        problems.append("environment_factory")
    if getattr(trainer, "_is_vlm", False):
        problems.append("a vision-language processor")
    return problems


def heldout_generator(seed: int, step: int) -> torch.Generator:
    """The held-out stream of step ``step``: the reference loop's per-step seed plus a fixed
    offset, so it is reproducible (and resumable) and shares nothing with training's streams."""
    return torch.Generator().manual_seed(stream_seed(seed, step, HELDOUT_STREAM))


def pick_rows(rows: Sequence[dict[str, Any]], n: int, gen: torch.Generator) -> list[dict[str, Any]]:
    """``n`` distinct rows drawn by ``gen`` (with replacement only when there are fewer than ``n``)."""
    idx = torch.randperm(len(rows), generator=gen)[:n] if n <= len(rows) else torch.randint(len(rows), (n,),
                                                                                          generator=gen)
    return [rows[int(i)] for i in idx]


def sample_completions(
    trainer: MTPGRPOTrainer, lm: nn.Module, prompts: list[Any], seed: int
) -> tuple[Tensor, Tensor, list[list[int]]]:
    """Left-padded prompt ids and mask ``[N, P]`` and each completion's ids cut after its first
    EOS, sampled from ``lm`` with TRL's generation config under a seeded fork of the RNG."""
    device = trainer.accelerator.device
    pad_id = trainer._tokenizer.pad_token_id
    # TRL's own prompt tokenization (its chat template for conversational prompts); it has no
    # side effects without environments or images, both refused
    prompt_lists, _, _ = trainer._tokenize_prompts(prompts)
    prompt_tensors = [torch.tensor(ids, dtype=torch.long) for ids in prompt_lists]
    multiple = trainer.pad_to_multiple_of
    prompt_ids = pad(prompt_tensors, padding_value=pad_id, padding_side="left", pad_to_multiple_of=multiple)
    prompt_mask = pad([torch.ones_like(t) for t in prompt_tensors], padding_value=0, padding_side="left",
                      pad_to_multiple_of=multiple)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    # sampling draws on the CPU generator and this device's only: the fork restores both, so the
    # training streams are where they were whether or not the held-out batch is built
    with seeded_fork(seed, device), torch.no_grad():
        out = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, synced_gpus=False,
                          generation_config=copy.deepcopy(trainer.generation_config))
    completion_ids = out[:, prompt_ids.shape[1]:]
    # as TRL: keep everything up to and including the first EOS
    is_eos = torch.isin(completion_ids, torch.tensor(trainer.eos_token_ids, device=device))
    eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long, device=device)
    eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
    keep = torch.arange(is_eos.size(1), device=device).expand_as(is_eos) <= eos_idx.unsqueeze(1)
    completions = [c[m].tolist() for c, m in zip(completion_ids.cpu(), keep.cpu(), strict=True)]
    return prompt_ids, prompt_mask, completions


def decode_completions(trainer: MTPGRPOTrainer, prompts: list[Any], prompt_ids: Tensor, prompt_mask: Tensor,
                       completion_ids: list[list[int]]) -> list[Any]:
    """The completions as the reward functions see them in TRL: text, or one assistant message
    for conversational prompts (parsed with the tokenizer's response template where it has one)."""
    from trl.data_utils import is_conversational

    if not is_conversational({"prompt": prompts[0]}):
        return trainer.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
    tok = trainer._tokenizer
    if Version(transformers.__version__) >= Version("5.0.0") and (
        getattr(tok, "response_template", None) is not None or getattr(tok, "response_schema", None) is not None
    ):
        from trl.chat_template_utils import parse_response

        prefixes = [row[m.bool()].tolist() for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)]
        return [[parse_response(tok, ids, prefix=prefix, tools=None)]
                for ids, prefix in zip(completion_ids, prefixes, strict=True)]
    contents = trainer.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
    return [[{"role": "assistant", "content": c}] for c in contents]


def _ignore(*args: Any, **kwargs: Any) -> None:
    """Stands in for TRL's ``log_extra``/``log_metric``: held-out rewards are not training's logs."""


def heldout_rewards(trainer: MTPGRPOTrainer, rows: list[dict[str, Any]], completions: list[Any],
                    completion_ids: list[list[int]]) -> Tensor:
    """``[N, F]`` rewards of each reward function, called as TRL calls them (``prompts``,
    ``completions``, ``completion_ids`` and every other column as keyword lists, plus
    ``trainer_state``); ``None`` becomes NaN."""
    prompts = [row["prompt"] for row in rows]
    keys = [k for k in rows[0] if k not in ("prompt", "completion", "completion_ids")]
    kwargs: dict[str, Any] = {k: [row[k] for row in rows] for k in keys}
    kwargs.update(trainer_state=trainer.state, log_extra=_ignore, log_metric=_ignore)
    out = torch.zeros(len(rows), len(trainer.reward_funcs), device=trainer.accelerator.device)
    for i, (func, name) in enumerate(zip(trainer.reward_funcs, trainer.reward_func_names, strict=True)):
        values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        if is_async_callable(func):  # TRL runs these on its own event loop thread
            values = asyncio.run_coroutine_threadsafe(values, trainer.async_loop).result()
        values = [math.nan if v is None else v for v in values]
        if len(values) != len(rows):
            raise ValueError(f"reward function {name!r} returned {len(values)} rewards for {len(rows)} held-out "
                             "completions")
        out[:, i] = torch.tensor(values, dtype=torch.float32, device=out.device)
    return out


def group_advantages(trainer: MTPGRPOTrainer, rewards_per_func: Tensor, num_generations: int) -> Tensor:
    """TRL's advantages for the trainer's ``multi_objective_aggregation`` and ``scale_rewards``
    (groups of ``num_generations`` consecutive completions; unscorable completions get 0)."""
    G, weights = num_generations, trainer.reward_weights.to(rewards_per_func.device).unsqueeze(0)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    if trainer.multi_objective_aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, G, rewards_per_func.shape[1])
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if G > 1 else torch.zeros_like(mean_k)
        rewards = (((grouped - mean_k) / (std_k + 1e-4)).view(-1, rewards_per_func.shape[1]) * weights).nansum(dim=1)
        rewards[unscorable] = torch.nan
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        return torch.nan_to_num((rewards - torch.nanmean(rewards)) / (std + 1e-4), nan=0.0)
    rewards = (rewards_per_func * weights).nansum(dim=1)
    rewards[unscorable] = torch.nan
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    scale = trainer.scale_rewards
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G) if G > 1 else torch.zeros_like(rewards)
    elif scale == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards={scale!r}: expected 'batch', 'group' or 'none'")
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def heldout_inputs(trainer: MTPGRPOTrainer, lm: nn.Module, step: int, size: int) -> dict[str, Tensor]:
    """A TRL-shaped micro-batch of ``size`` fresh rollouts from ``lm`` (module docstring):
    ``prompt_ids``, ``prompt_mask``, ``completion_ids``, ``completion_mask``, ``advantages``."""
    G = trainer.num_generations
    gen = heldout_generator(trainer.args.seed, step)
    chosen = pick_rows(trainer.heldout_prompts, -(-size // G), gen)  # ceil: whole groups
    # groups contiguous, as TRL's sampler repeats them; copies, so that a reward function cannot
    # alter the caller's rows
    rows = [copy.deepcopy(dict(row)) for row in chosen for _ in range(G)]
    prompts = [row["prompt"] for row in rows]
    sample_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    prompt_ids, prompt_mask, completion_lists = sample_completions(trainer, lm, prompts, sample_seed)
    completions = decode_completions(trainer, prompts, prompt_ids, prompt_mask, completion_lists)
    advantages = group_advantages(trainer, heldout_rewards(trainer, rows, completions, completion_lists), G)
    device, multiple = prompt_ids.device, trainer.pad_to_multiple_of
    tensors = [torch.tensor(ids, dtype=torch.long) for ids in completion_lists]
    completion_ids = pad(tensors, padding_value=trainer._tokenizer.pad_token_id, padding_side="right",
                         pad_to_multiple_of=multiple).to(device)
    completion_mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="right",
                          pad_to_multiple_of=multiple).to(device)
    if trainer.mask_truncated_completions:  # as TRL: a completion without EOS is not trained on
        ends = [*trainer.eos_token_ids, trainer._tokenizer.pad_token_id]
        truncated = torch.tensor([ids[-1] not in ends for ids in completion_lists], device=device)
        completion_mask = completion_mask * (~truncated).unsqueeze(1).int()
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages.to(device)}
    # whole groups were needed for the advantages; the split has the training batch's size
    return {k: v[:size] for k, v in inputs.items()}


def heldout_batch(trainer: MTPGRPOTrainer, view: MTPModelView, step: int, size: int) -> RolloutBatch:
    """The held-out micro-batch of ``size`` sequences as a :class:`RolloutBatch`, with ``ℓ^old``
    the current policy's log-probs (``view``'s, as ``J`` will compute them). Call it with the
    model in :func:`~decomp.integrations.trl.align.plain_forward` (eval mode, no dropout)."""
    inputs = heldout_inputs(trainer, view.lm, step, size)
    tokens = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    params = {k: v.detach() for k, v in view.named_parameters()}
    with torch.no_grad():
        logp, _, _ = model_logprobs(view, params, tokens, attention_mask=attention_mask, with_mtp=False)
    return rollout_batch(inputs, logp[:, inputs["prompt_ids"].shape[1] - 1 :])
