"""Text tasks for Hugging Face models: questions, reference answers, verifiable rewards.

- Built-in: ``add1`` (``"What is 3+4?"`` → 7; single digits: SmolLM2-135M-Instruct gets about
  a fifth right, enough signal for RL on a CPU) and ``add`` (two-digit operands).
- ``--dataset FILE.jsonl``: one JSON object per line with ``question`` and ``answer``.

A task's problems are split once by the fixed permutation of
:func:`decomp.training.tasks.held_out_split` (independent of the run seed) into a held-out set
(``min(500, max(1, ⌊0.3 n⌋))`` of the ``n`` problems) and the training pool.

Rewards (1.0 or 0.0, never an exception):

- ``last_integer``: the last integer in the reply equals the reference answer (an integer);
- ``math``: ``math-verify`` judges the reply's final answer (``\\boxed{}`` or LaTeX) equal to the
  reference (``\\boxed{\\frac{1}{2}}`` matches ``0.5``, ``\\boxed{3}`` matches ``3.0``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from decomp.training.tasks import held_out_split

TEXT_HELD_OUT = 500  # at most this many held out: generation with a real LM is the cost

ARITHMETIC_SYSTEM_PROMPT = "Answer with the number only."
MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class TextProblem:
    question: str
    answer: str


_INT = re.compile(r"-?\d+")


def last_integer_reward(reply: str, answer: str) -> float:
    """1.0 when the last integer in ``reply`` equals the integer ``answer``."""
    try:
        found = _INT.findall(reply)
        return 1.0 if found and int(found[-1]) == int(answer) else 0.0
    except (ValueError, TypeError):
        return 0.0


def math_reward(reply: str, answer: str) -> float:
    """1.0 when math-verify finds the reply's final answer equal to ``answer``."""
    try:
        from math_verify import parse, verify
    except ImportError as err:  # pragma: no cover - the hf extra brings it
        raise RuntimeError("the math reward needs math-verify: pip install 'decomp[hf]'") from err
    try:
        gold = parse(answer if "$" in answer or "\\boxed" in answer else f"${answer}$")
        pred = parse(reply)
        return 1.0 if gold and pred and verify(gold, pred) else 0.0
    except Exception:  # malformed LaTeX and parser failures are wrong answers, not crashes
        return 0.0


REWARDS: dict[str, Callable[[str, str], float]] = {"last_integer": last_integer_reward, "math": math_reward}


@dataclass
class TextTask:
    name: str
    train: list[TextProblem]
    held_out: list[TextProblem]
    reward_name: str
    system_prompt: str | None
    max_new_tokens: int

    def reward(self, reply: str, problem: TextProblem) -> float:
        return REWARDS[self.reward_name](reply, problem.answer)


def split(problems: list[TextProblem]) -> tuple[list[TextProblem], list[TextProblem]]:
    """``(train, held_out)`` with ``min(TEXT_HELD_OUT, max(1, ⌊0.3 n⌋))`` held out (module docstring)."""
    return held_out_split(problems, min(TEXT_HELD_OUT, max(1, int(0.3 * len(problems)))))


def read_dataset(path: Path | str) -> list[TextProblem]:
    """``question``/``answer`` records of a JSONL file; a bad line is a ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset {path} does not exist")
    problems = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                problems.append(TextProblem(str(record["question"]), str(record["answer"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'question' and 'answer'") from None
    if len(problems) < 2:
        raise ValueError(f"dataset {path} needs at least 2 problems, has {len(problems)}")
    return problems


def make_text_task(name: str, dataset: str = "", reward: str = "auto", max_new_tokens: int = 0) -> TextTask:
    """A built-in task (``add1``, ``add``) or a JSONL dataset, with its reward."""
    if reward not in ("auto", *REWARDS):
        raise ValueError(f"unknown reward {reward!r}; valid rewards: auto, {', '.join(REWARDS)}")
    if dataset:
        problems = read_dataset(dataset)
        reward_name = "math" if reward == "auto" else reward
        system = MATH_SYSTEM_PROMPT if reward_name == "math" else None
        train, held = split(problems)
        return TextTask(Path(dataset).stem, train, held, reward_name, system, max_new_tokens or 256)
    if name == "add1":
        problems = [TextProblem(f"What is {a}+{b}?", str(a + b)) for a in range(10) for b in range(10)]
    elif name == "add":
        problems = [TextProblem(f"What is {a}+{b}?", str(a + b)) for a in range(10, 100) for b in range(10, 100)]
    else:
        raise ValueError(f"unknown text task {name!r}; valid: add1, add (or --dataset FILE.jsonl)")
    train, held = split(problems)
    reward_name = "last_integer" if reward == "auto" else reward
    return TextTask(name, train, held, reward_name, ARITHMETIC_SYSTEM_PROMPT, max_new_tokens or 12)
