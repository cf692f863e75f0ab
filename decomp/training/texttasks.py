"""Text tasks for Hugging Face models: questions, reference answers, verifiable rewards.

- Built-in: ``add1`` (``"What is 3+4?"`` → 7; single digits: SmolLM2-135M-Instruct gets about
  a fifth right, enough signal for RL on a CPU) and ``add`` (two-digit operands).
- ``--dataset FILE.jsonl``: one JSON object per line (UTF-8; blank lines skipped) with a
  non-empty string ``question`` and an ``answer`` (a non-empty string or a finite number; an
  integer with the ``last_integer`` reward), at least 2 problems. Anything else is a
  ``ValueError`` of one line naming the file and, where one line is at fault, the line: it is
  read before the model is loaded, so a bad file fails in seconds.

A task's problems are split once by the fixed permutation of
:func:`decomp.training.tasks.held_out_split` (independent of the run seed) into a held-out set
(``min(500, max(1, ⌊0.3 n⌋))`` of the ``n`` problems) and the training pool.

Rewards (1.0 or 0.0, never an exception):

- ``last_integer``: the last integer in the reply equals the reference answer (an integer);
- ``math``: ``math-verify`` judges the reply's final answer (``\\boxed{}`` or LaTeX) equal to the
  reference (``\\boxed{\\frac{1}{2}}`` matches ``0.5``, ``\\boxed{3}`` matches ``3.0``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from decomp.runlog import BadJSON, parse_json
from decomp.training.tasks import held_out_split

TEXT_HELD_OUT = 500  # at most this many held out: generation with a real LM is the cost

ARITHMETIC_SYSTEM_PROMPT = "Answer with the number only."
MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class TextProblem:
    question: str
    answer: str


_INT = re.compile(r"-?\d+")
_INTEGER_ANSWER = re.compile(r"[-+]?\d+")  # answers int() reads (last_integer_reward compares int(answer))


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


DATASET_FORMAT = "a JSON object with 'question' and 'answer'"


def _json_kind(value: object) -> str:
    """How a JSON value reads in an error message (never the value itself: it may be huge)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    if isinstance(value, (int, float)):
        return "a number" if isinstance(value, int) or math.isfinite(value) else str(value)
    return {dict: "an object", list: "an array"}.get(type(value), type(value).__name__)


def _parse_line(where: str, raw: bytes, first: bool) -> TextProblem | None:
    """The problem on one line of a dataset (``None`` for a blank line); ``where`` is
    ``FILE:LINE`` for the messages."""
    if first:
        raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark some editors write
    if not raw.strip():
        return None
    try:
        record = parse_json(raw)
    except BadJSON as err:
        detail = f" ({err.detail})" if err.detail else ""
        raise ValueError(f"{where}: {err.problem}{detail}; expected {DATASET_FORMAT}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected {DATASET_FORMAT}, got {_json_kind(record)}")
    missing = [k for k in ("question", "answer") if k not in record]
    if missing:
        raise ValueError(f"{where}: expected {DATASET_FORMAT} (missing {' and '.join(map(repr, missing))})")
    question, answer = record["question"], record["answer"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string, got {_json_kind(question)}")
    number = isinstance(answer, (int, float)) and not isinstance(answer, bool)
    if not ((isinstance(answer, str) and answer.strip()) or (number and math.isfinite(answer))):
        raise ValueError(f"{where}: 'answer' must be a non-empty string or a finite number, got {_json_kind(answer)}")
    return TextProblem(question, str(answer))


def _read_numbered(path: Path) -> list[tuple[int, TextProblem]]:
    """``(line number, problem)`` of every non-blank line of the dataset at ``path``."""
    if not path.exists():
        raise ValueError(f"dataset {path} does not exist")
    if not path.is_file():
        raise ValueError(f"dataset {path} is not a file")
    problems = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                problem = _parse_line(f"{path}:{lineno}", raw, first=lineno == 1)
                if problem is not None:
                    problems.append((lineno, problem))
    except OSError as err:
        raise ValueError(f"dataset {path} cannot be read ({err.strerror or type(err).__name__})") from None
    if len(problems) < 2:
        raise ValueError(f"dataset {path} needs at least 2 problems ({DATASET_FORMAT} per line), "
                         f"has {len(problems)}")
    return problems


def read_dataset(path: Path | str) -> list[TextProblem]:
    """The ``question``/``answer`` records of a JSONL file (module docstring). A file that cannot
    be used is a one-line ``ValueError`` naming it, and the line where one line is at fault."""
    return [problem for _, problem in _read_numbered(Path(path))]


def make_text_task(name: str, dataset: str = "", reward: str = "auto", max_new_tokens: int = 0) -> TextTask:
    """A built-in task (``add1``, ``add``) or a JSONL dataset, with its reward."""
    if reward not in ("auto", *REWARDS):
        raise ValueError(f"unknown reward {reward!r}; valid rewards: auto, {', '.join(REWARDS)}")
    if dataset:
        numbered = _read_numbered(Path(dataset))
        reward_name = "math" if reward == "auto" else reward
        for lineno, problem in numbered:  # last_integer compares integers: any other answer scores 0 forever
            if reward_name == "last_integer" and not _INTEGER_ANSWER.fullmatch(problem.answer.strip()):
                raise ValueError(f"{dataset}:{lineno}: the last_integer reward needs an integer answer, "
                                 f"got {problem.answer[:40]!r}; use --set reward=math")
        problems = [problem for _, problem in numbered]
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
