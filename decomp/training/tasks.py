"""Verifiable arithmetic tasks with a character tokenizer, fixed held-out sets and exact rewards.

Tasks (``TASKS``):

- ``add`` (default): ``"37+45="`` → ``"82"``, both operands two-digit (10–99).
- ``chain``: ``"12+34+56="`` → ``"46,102"``: the running sums of three two-digit numbers, so the
  answer is several multi-digit tokens long and each partial sum constrains the next tokens —
  where predicting two tokens ahead matters. Only the final sum is rewarded.

Sequences are ``<bos> prompt answer <eos>``. The reward is 1 when the response parses and its
final number is exactly the answer, else 0; malformed output (no ``<eos>``, a stray symbol,
a leading zero, an empty field) gets 0 and never raises.

Each task's problems are split once by a fixed permutation (independent of the run seed) into a
held-out set of ``HELD_OUT`` problems and the training pool (:func:`held_out_split`, shared with
the text tasks of :mod:`decomp.training.texttasks`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import torch
from torch import Tensor

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ["<pad>", "<bos>", "<eos>"]
CHARS = "0123456789+*=,"
VOCAB = SPECIALS + list(CHARS)
VOCAB_SIZE = len(VOCAB)
_CHAR_ID = {c: i + len(SPECIALS) for i, c in enumerate(CHARS)}
SPLIT_SEED = 20260526  # fixes the held-out split of every task, character and text alike
HELD_OUT = 2000  # greedy accuracy on 2000 problems has a sampling sd ≤ 1.1 points

P = TypeVar("P")


def held_out_split(problems: Sequence[P], n_held: int) -> tuple[list[P], list[P]]:
    """``(train, held_out)``: with ``π = randperm(len(problems))`` drawn from a generator seeded
    with ``SPLIT_SEED``, ``held_out = problems[π[:n_held]]`` and ``train = problems[π[n_held:]]``
    (both in permutation order). The split depends only on the problems, never on the run seed."""
    if not 0 <= n_held <= len(problems):
        raise ValueError(f"n_held must be in [0, {len(problems)}], got {n_held}")
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    return [problems[i] for i in order[n_held:]], [problems[i] for i in order[:n_held]]


def encode(text: str) -> list[int]:
    """Character ids of ``text`` (characters from ``CHARS`` only)."""
    try:
        return [_CHAR_ID[c] for c in text]
    except KeyError as err:
        raise ValueError(f"character {err.args[0]!r} is not in the vocabulary {CHARS!r}") from None


def decode(ids: list[int] | Tensor) -> str:
    """Readable text of token ids (specials shown as ``<bos>``, ``<eos>``, ``<pad>``)."""
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    return "".join(VOCAB[i] if 0 <= i < VOCAB_SIZE else "<?>" for i in ids)


@dataclass(frozen=True)
class Problem:
    prompt: str  # e.g. "37+45="
    answer: int  # the number the final field of the response must equal
    target: str  # the canonical full response, e.g. "82" or "46,102"


class Task:
    """A family of problems with a fixed train/held-out split and an exact reward."""

    name = "task"
    prompt_len = 0  # characters in every prompt (all prompts have equal length)
    max_response_len = 0  # longest canonical response, <eos> included
    n_fields = 1  # comma-separated numbers in a well-formed response
    _field = re.compile(r"(0|[1-9][0-9]*)")

    def all_problems(self) -> list[Problem]:
        raise NotImplementedError

    @cached_property
    def _split(self) -> tuple[list[Problem], list[Problem]]:
        return held_out_split(self.all_problems(), HELD_OUT)

    @property
    def train(self) -> list[Problem]:
        return self._split[0]

    @property
    def held_out(self) -> list[Problem]:
        return self._split[1]

    @property
    def seq_len(self) -> int:
        """``<bos>`` + prompt + the longest response (with ``<eos>``)."""
        return 1 + self.prompt_len + self.max_response_len

    def prompt_ids(self, problems: list[Problem]) -> Tensor:
        """``[N, 1 + prompt_len]`` ids of ``<bos> prompt``."""
        return torch.tensor([[BOS] + encode(p.prompt) for p in problems], dtype=torch.long)

    def target_ids(self, problems: list[Problem]) -> Tensor:
        """``[N, max_response_len]`` ids of ``target <eos>``, right-padded with ``<pad>``."""
        rows = []
        for p in problems:
            ids = encode(p.target) + [EOS]
            rows.append(ids + [PAD] * (self.max_response_len - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def parse(self, response: list[int]) -> int | None:
        """The final number of a response, or ``None`` when it is malformed."""
        if EOS not in response:
            return None
        body = response[: response.index(EOS)]
        if any(t < len(SPECIALS) for t in body):
            return None
        text = decode(body)
        fields = text.split(",")
        if len(fields) != self.n_fields or not all(self._field.fullmatch(f) for f in fields):
            return None
        return int(fields[-1])

    def reward(self, response: list[int] | Tensor, problem: Problem) -> float:
        """1.0 when the response's final number equals the answer, else 0.0 (never raises)."""
        if isinstance(response, Tensor):
            response = response.tolist()
        try:
            value = self.parse(response)
        except Exception:  # a reward must never crash a run
            return 0.0
        return 1.0 if value is not None and value == problem.answer else 0.0

    def rewards(self, responses: Tensor, problems: list[Problem]) -> Tensor:
        """Rewards of a ``[N, R]`` batch of responses as a float tensor ``[N]``."""
        return torch.tensor([self.reward(r, p) for r, p in zip(responses.tolist(), problems, strict=True)])


class Addition(Task):
    """Two-digit addition: ``"37+45="`` → ``"82"``."""

    name = "add"
    prompt_len = 6
    max_response_len = 4  # three digits + <eos>

    def all_problems(self) -> list[Problem]:
        return [Problem(f"{a}+{b}=", a + b, str(a + b)) for a, b in itertools.product(range(10, 100), repeat=2)]


class ChainedSum(Task):
    """Running sums of three two-digit numbers: ``"12+34+56="`` → ``"46,102"``."""

    name = "chain"
    prompt_len = 9
    max_response_len = 8  # "198,297" + <eos>
    n_fields = 2

    n_problems = 20_000  # of the 90³ triples, a fixed random subset

    def all_problems(self) -> list[Problem]:
        gen = torch.Generator().manual_seed(SPLIT_SEED)
        index = torch.randperm(90**3, generator=gen)[: self.n_problems].sort().values.tolist()
        triples = [(10 + i // 8100, 10 + (i // 90) % 90, 10 + i % 90) for i in index]
        return [Problem(f"{a}+{b}+{c}=", a + b + c, f"{a + b},{a + b + c}") for a, b, c in triples]


TASKS: dict[str, type[Task]] = {"add": Addition, "chain": ChainedSum}


def make_task(name: str) -> Task:
    """The task called ``name``; a ``ValueError`` lists the valid names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]()
