"""A dataset file decomp cannot use ends in one line naming the file (and the line at fault),
before any model is loaded: at the level of :mod:`decomp.training.texttasks` and once through
``decomp run``."""

from __future__ import annotations

import json
import re
import sys

import pytest

from decomp.training.texttasks import make_text_task, read_dataset

GOOD = '{"question": "1+1?", "answer": "2"}\n'
G = GOOD.encode()

# (file content, the message after "FILE:LINE: " or "dataset FILE ")
BAD_LINES = [
    (b"not json\n", 1, "not valid JSON (Expecting value at column 1)"),
    (G + b'{"question": "q", "answer": "1"} extra\n', 2, "not valid JSON (Extra data"),
    (b'{"q": 1}\n' + G, 1, "(missing 'question' and 'answer')"),
    (G + b'{"question": "x"}\n', 2, "(missing 'answer')"),
    (b"[1, 2]\n" + G, 1, "expected a JSON object with 'question' and 'answer', got an array"),
    (b'"text"\n' + G, 1, "got a string"),
    (b"null\n" + G, 1, "got null"),
    (G + b'{"question": "", "answer": "1"}\n', 2, "'question' must be a non-empty string, got an empty string"),
    (G + b'{"question": {"a": 1}, "answer": "1"}\n', 2, "'question' must be a non-empty string, got an object"),
    (G + b'{"question": "q", "answer": null}\n', 2, "'answer' must be a non-empty string or a finite number, got null"),
    (G + b'{"question": "q", "answer": true}\n', 2, "got true"),
    (G + b'{"question": "q", "answer": NaN}\n', 2, "got nan"),
    (G + b'{"question": "q", "answer": 1e400}\n', 2, "got inf"),
    (G + b'{"question": "q", "answer": [1]}\n', 2, "got an array"),
    (G + b'{"question": "q\xff", "answer": "1"}\n', 2, "not UTF-8 text (byte 0xff at byte 16 of the line)"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n" + G, 1, "nested too deeply to parse"),
]


@pytest.mark.parametrize("content,line,message", BAD_LINES, ids=range(len(BAD_LINES)))
def test_a_bad_line_is_one_line_naming_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        read_dataset(path)
    text = str(err.value)
    assert text.startswith(f"{path}:{line}: ") and message in text and "\n" not in text
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:{line}: "):
        make_text_task("add1", dataset=str(path))  # the same check where the run reads it


def test_an_integer_beyond_pythons_digit_limit(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(G + b'{"question": "q", "answer": ' + b"9" * 5000 + b"}\n")
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(4300)  # the default (PYTHONINTMAXSTRDIGITS may change it)
    try:
        # read as a float (decomp.runlog.parse_json), too large to be finite
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: 'answer' must be .* got inf"):
            read_dataset(path)
    finally:
        sys.set_int_max_str_digits(limit)


@pytest.mark.parametrize("content,message", [
    (b"", "needs at least 2 problems (a JSON object with 'question' and 'answer' per line), has 0"),
    (b"\n  \n\r\n", "has 0"),
    (G, "has 1"),
])
def test_too_few_problems(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^dataset {re.escape(str(path))} ") as err:
        read_dataset(path)
    assert message in str(err.value)


def test_a_path_that_is_no_file(tmp_path):
    with pytest.raises(ValueError, match=f"^dataset {re.escape(str(tmp_path / 'none.jsonl'))} does not exist$"):
        read_dataset(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match=f"^dataset {re.escape(str(tmp_path))} is not a file$"):
        read_dataset(tmp_path)


def test_good_files_read_as_before(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"question": "1/2 as a decimal?", "answer": "0.5"}, {"question": "q", "answer": 3, "extra": [1]},
            {"question": "é?", "answer": 0.25}]
    # a byte-order mark, blank lines and Windows line ends are accepted
    lines = "\r\n\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    path.write_bytes(b"\xef\xbb\xbf" + lines.encode() + b"\n")
    assert [(p.question, p.answer) for p in read_dataset(path)] == [("1/2 as a decimal?", "0.5"), ("q", "3"),
                                                                    ("é?", "0.25")]
    task = make_text_task("add1", dataset=str(path))
    assert task.reward_name == "math" and len(task.train) + len(task.held_out) == 3


def test_last_integer_reward_needs_integer_answers(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(GOOD + '{"question": "half?", "answer": "1/2"}\n')
    message = "the last_integer reward needs an integer answer, got '1/2'"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: {message}"):
        make_text_task("add1", dataset=str(path), reward="last_integer")
    assert make_text_task("add1", dataset=str(path)).reward_name == "math"  # the default reward takes it
    path.write_text(GOOD + '{"question": "minus?", "answer": -3}\n')
    assert make_text_task("add1", dataset=str(path), reward="last_integer").reward_name == "last_integer"


def test_cli_bad_dataset_is_one_line_and_exit_2_before_the_model_loads(tiny_checkpoint, tmp_path, capsys,
                                                                     monkeypatch):
    from decomp.training import policies
    from decomp.training.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the dataset was checked")

    monkeypatch.setattr(policies, "load_hf", no_model)
    data = tmp_path / "bad.jsonl"
    data.write_text(GOOD + "{not json\n")
    code = main(["run", "--model", str(tiny_checkpoint), "--dataset", str(data), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [f"decomp run: error: {data}:2: not valid JSON (Expecting property name enclosed "
                                "in double quotes at column 2); expected a JSON object with 'question' and 'answer'"]

