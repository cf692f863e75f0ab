"""Tasks: tokenizer, fixed splits and exact rewards that never raise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decomp.training.tasks import (
    BOS,
    EOS,
    PAD,
    VOCAB_SIZE,
    Problem,
    decode,
    encode,
    make_task,
)


def _resp(text: str, eos: bool = True, pad: int = 0) -> list[int]:
    return encode(text) + ([EOS] if eos else []) + [PAD] * pad


def test_addition_rewards():
    task = make_task("add")
    p = Problem("37+45=", 82, "82")
    assert task.reward(_resp("82", pad=1), p) == 1.0
    assert task.reward(_resp("83"), p) == 0.0
    assert task.reward(_resp("82", eos=False), p) == 0.0  # ran out of length
    assert task.reward(_resp("082"), p) == 0.0  # leading zero is not the canonical answer
    assert task.reward(_resp(""), p) == 0.0
    assert task.reward(_resp("8+2"), p) == 0.0
    assert task.reward([BOS] + _resp("82"), p) == 0.0
    assert task.reward(_resp("8,2"), p) == 0.0
    assert task.reward(torch.tensor(_resp("82")), p) == 1.0


def test_chain_rewards_check_the_final_sum_only():
    task = make_task("chain")
    p = Problem("12+34+56=", 102, "46,102")
    assert task.reward(_resp("46,102"), p) == 1.0
    assert task.reward(_resp("47,102"), p) == 1.0  # process is not rewarded, only the answer
    assert task.reward(_resp("102"), p) == 0.0  # one field is malformed for chain
    assert task.reward(_resp("46,102,"), p) == 0.0
    assert task.reward(_resp("46,,102"), p) == 0.0


TASK_OBJECTS = {name: make_task(name) for name in ("add", "chain")}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, VOCAB_SIZE + 3), max_size=12), st.sampled_from(["add", "chain"]))
def test_rewards_never_raise_on_garbage(tokens, name):
    task = TASK_OBJECTS[name]
    assert task.reward(tokens, task.held_out[0]) in (0.0, 1.0)


@pytest.mark.parametrize("name", ["add", "chain"])
def test_split_is_fixed_disjoint_and_targets_are_correct(name):
    a, b = make_task(name), make_task(name)
    assert [p.prompt for p in a.held_out] == [p.prompt for p in b.held_out]
    assert len(a.held_out) == 2000
    assert not {p.prompt for p in a.held_out} & {p.prompt for p in a.train}
    for p in a.held_out[:50]:
        numbers = [int(x) for x in p.prompt.rstrip("=").split("+")]
        assert p.answer == sum(numbers)
        assert a.reward(_resp(p.target), p) == 1.0
    prompts, targets = a.prompt_ids(a.held_out[:3]), a.target_ids(a.held_out[:3])
    assert prompts.shape == (3, 1 + a.prompt_len) and targets.shape == (3, a.max_response_len)
    assert a.seq_len == prompts.shape[1] + targets.shape[1]


def test_encode_decode_and_unknown_characters():
    assert decode(encode("12+3=")) == "12+3="
    assert decode([BOS, EOS, PAD]) == "<bos><eos><pad>"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encode("1-2")
    with pytest.raises(ValueError, match="valid tasks: add, chain"):
        make_task("mul")


def _old_split(problems: list, n_held: int) -> tuple[list, list]:
    """The permutation logic both task modules had before they shared one split (seed written out)."""
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(20260526)).tolist()
    return [problems[i] for i in order[n_held:]], [problems[i] for i in order[:n_held]]


@pytest.mark.parametrize("name", ["add", "chain"])
def test_character_task_split_is_unchanged(name):
    task = make_task(name)
    train, held = _old_split(task.all_problems(), 2000)
    assert task.held_out == held and task.train == train


@pytest.mark.parametrize("name,n_held", [("add1", 30), ("add", 500)])
def test_text_task_split_is_unchanged_and_shared(name, n_held):
    from decomp.training import tasks, texttasks

    task = texttasks.make_text_task(name)
    problems = sorted(task.train + task.held_out, key=lambda p: [int(x) for x in p.question[8:-1].split("+")])
    train, held = _old_split(problems, n_held)
    assert task.held_out == held and task.train == train
    assert texttasks.split(problems) == tasks.held_out_split(problems, n_held)
    assert not hasattr(texttasks, "SPLIT_SEED")  # one seed, in decomp.training.tasks
    with pytest.raises(ValueError, match="n_held"):
        tasks.held_out_split(problems, len(problems) + 1)
