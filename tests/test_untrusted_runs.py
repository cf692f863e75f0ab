"""Run directories are untrusted input: damage loses the damaged line (or run), never the command.

`decomp plot`, `validate` and `report` read whatever a run directory holds. A line nested too
deeply for the parser, bytes that are not UTF-8, a number no float holds, a field of the wrong
type: each is skipped with a warning naming the file and line, the good runs are analysed (exit
0), and when no run is usable the command says so in one line (exit 2).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from synthetic_runs import write_run

from decomp.results.rundata import AnalysisError, load_runs
from decomp.runlog import iter_jsonl, truncate_jsonl
from decomp.training.cli import main

DEEP_LIST = b"[" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000


def _load(root: Path) -> tuple[list, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = load_runs([root])
    return runs, [str(w.message) for w in caught]


def _insert_line(path: Path, index: int, line: bytes) -> int:
    """Put ``line`` before line ``index`` (0-based) of ``path``; return its 1-based number."""
    lines = path.read_bytes().splitlines(keepends=True)
    lines.insert(index, line + b"\n")
    path.write_bytes(b"".join(lines))
    return index + 1


def _append_edited(path: Path, edit: dict) -> int:
    """Append a copy of the file's first record with ``edit`` applied; return its line number."""
    lines = path.read_bytes().splitlines()
    record = json.loads(lines[0]) | edit
    path.write_bytes(b"\n".join(lines) + b"\n" + json.dumps(record).encode() + b"\n")
    return len(lines) + 1


LINE_IDS = ["deep-list", "deep-object", "not-utf8", "5000-digits", "401-digits", "1e400", "string", "true", "negative",
            "fraction", "null"]


@pytest.mark.parametrize("line,problem", ids=LINE_IDS, argvalues=[
    (DEEP_LIST, "a line that is nested too deeply to parse"),
    (DEEP_OBJECT, "a line that is nested too deeply to parse"),
    (b'{"step": 3, "regime": "occ \xff\xfe"}', "a line that is not UTF-8 text"),
    (b'{"step": ' + b"9" * 5000 + b', "regime": "occ"}', "a record whose step is inf, not a non-negative integer"),
    (b'{"step": 1' + b"0" * 400 + b', "regime": "occ"}', "a record whose step is inf"),
    (b'{"step": 1e400, "regime": "occ", "accuracy": 0.9}', "a record whose step is inf"),
    (b'{"step": "3", "regime": "occ", "accuracy": 0.9}', "a record whose step is a string"),
    (b'{"step": true, "regime": "occ", "accuracy": 0.9}', "a record whose step is a boolean"),
    (b'{"step": -1, "regime": "occ", "accuracy": 0.9}', "a record whose step is -1"),
    (b'{"step": 2.5, "regime": "occ", "accuracy": 0.9}', "a record whose step is 2.5"),
    (b'{"step": null, "regime": "occ", "accuracy": 0.9}', "a record whose step is nan"),
])
def test_a_damaged_log_line_costs_that_line_only(tmp_path, line, problem):
    run_dir = write_run(tmp_path, "occ", 0, n=20)
    metrics = run_dir / "metrics.jsonl"
    lineno = _insert_line(metrics, 2, line)  # in the middle: the lines after it are still read
    runs, messages = _load(tmp_path)
    assert len(messages) == 1 and messages[0].startswith(f"{metrics}:{lineno}: skipping {problem}"), messages
    (run,) = runs
    assert [m["step"] for m in run.metrics] == list(range(21))
    assert run.evaluations == pytest.approx([0.4 + 0.2 * i / 20 for i in (10, 20)])


@pytest.mark.parametrize("name,edit,problem", [
    ("decomposition.jsonl", {"correlation": "0.1"}, "correlation is a string, not a number"),
    ("decomposition.jsonl", {"update": [1]}, "update is a list, not a non-negative integer"),
    ("decomposition.jsonl", {"direction": 3}, "direction is 3, not a string"),
    ("decomposition.jsonl", {"step": 10**30}, "step is 1e+30, not a non-negative integer"),
    ("sweeps.jsonl", {"coefs": []}, "coefs is an empty list, not a non-empty list of finite numbers"),
    ("sweeps.jsonl", {"coefs": [1.0, "x"]}, "coefs is a list, not a non-empty list of finite numbers"),
    ("sweeps.jsonl", {"realized": [0.0]}, "a sweep whose coefs, realized and quadratic differ in length"),
    ("sweeps.jsonl", {"quadratic": [[0.0]] * 13}, "quadratic is a list, not a non-empty list of finite numbers or nulls"),
    ("curvature.jsonl", {"eigenvalue_max": {"v": 1}}, "eigenvalue_max is an object, not a number"),
    ("curvature.jsonl", {"step": "10"}, "step is a string, not a non-negative integer"),
])
def test_a_record_with_a_field_of_the_wrong_type_is_skipped(tmp_path, name, edit, problem):
    """Each of these crashed a command (a string in np.asarray(dtype=float), a list as a dict
    key, a sweep's lists of different lengths in the figure) or would be read as data."""
    run_dir = write_run(tmp_path, "occ", 0, n=20)
    attribute = {"decomposition.jsonl": "decompositions", "sweeps.jsonl": "sweeps", "curvature.jsonl": "curvature"}
    before = len(getattr(load_runs([tmp_path])[0], attribute[name]))
    lineno = _append_edited(run_dir / name, edit)
    runs, messages = _load(tmp_path)
    what = problem if problem.startswith("a sweep") else f"a record whose {problem}"
    assert messages == [f"{run_dir / name}:{lineno}: skipping {what}"]
    assert len(getattr(runs[0], attribute[name])) == before


def test_undefined_values_of_the_right_fields_are_read(tmp_path):
    """What the writers do write is kept: ``null`` terms (read as nan), ``null`` points of a
    sweep, a seed written as 1.0 or null."""
    run_dir = write_run(tmp_path, "occ", 0, n=20)
    _append_edited(run_dir / "decomposition.jsonl", {"correlation": None, "lambda_star": None, "step": 21})
    _append_edited(run_dir / "sweeps.jsonl", {"realized": [None] * 13, "step": 21})
    runs, messages = _load(tmp_path)
    assert messages == []
    assert math.isnan(runs[0].decompositions[-1]["correlation"]) and runs[0].sweeps[-1]["realized"] == [None] * 13
    for seed, read in ((1.0, 1), (None, 0)):
        (run_dir / "config.json").write_text(json.dumps({"config": {"regime": "occ", "seed": seed}, "schema_version": 2}))
        runs, messages = _load(tmp_path)
        assert messages == [] and runs[0].seed == read


BAD_CONFIGS = [
    (b'{"config": {"regime": "occ", "seed": 1e400}, "schema_version": 2}', 1, "config seed is inf, not an integer"),
    (b'{"config": {"regime": "occ", "seed": NaN}, "schema_version": 2}', 1, "config seed is nan, not an integer"),
    (b'{"config": {"regime": "occ", "seed": ' + b"7" * 5000 + b'}, "schema_version": 2}', 1, "config seed is inf"),
    (b'{"config": {"regime": "occ", "seed": "abc"}, "schema_version": 2}', 1, "config seed is a string, not an integer"),
    (b'{"config": {"regime": "occ", "seed": [1]}, "schema_version": 2}', 1, "config seed is a list, not an integer"),
    (b'{"config": {"regime": "occ", "seed": true}, "schema_version": 2}', 1, "config seed is a boolean"),
    (b'{"config": {"regime": "occ", "seed": 2.5}, "schema_version": 2}', 1, "config seed is 2.5, not an integer"),
    (b'{"config": {"regime": {"a": 1}, "seed": 0}, "schema_version": 2}', 1, "config regime is an object, not a string"),
    (b'{"config": {"regime": "occ", "label": [1], "seed": 0}, "schema_version": 2}', 1, "config label is a list"),
    (b'{"config": {"regime": "occ", "task": 3, "seed": 0}, "schema_version": 2}', 1, "config task is 3, not a string"),
    (b'{"config": {"regime": "occ", "seed": 0}, "schema_version": true}', 1, "schema version a boolean"),
    (DEEP_LIST, 1, "unreadable config (nested too deeply to parse)"),
    (DEEP_OBJECT, 1, "unreadable config (nested too deeply to parse)"),
    (b'{"config": {"regime": "occ",\n "seed": 0, "note": "\xff"}, "schema_version": 2}', 2,
     "unreadable config (not UTF-8 text)"),
    (b'{"config": {"regime": "occ",\n\n "seed": 0,}, "schema_version": 2}', 3, "unreadable config (not valid JSON)"),
]


@pytest.mark.parametrize("text,line,problem", BAD_CONFIGS, ids=[
    "seed-1e400", "seed-nan", "seed-5000-digits", "seed-string", "seed-list", "seed-true", "seed-fraction",
    "regime-object", "label-list", "task-number", "version-true", "deep-list", "deep-object", "not-utf8-line-2",
    "not-json-line-3"])
def test_a_run_whose_config_is_unusable_is_skipped_with_one_warning(tmp_path, text, line, problem):
    good = write_run(tmp_path, "detach", 0, n=6)
    bad = write_run(tmp_path, "occ", 0, n=6)
    (bad / "config.json").write_bytes(text)
    runs, messages = _load(tmp_path)
    assert len(messages) == 1 and messages[0].startswith(f"{bad / 'config.json'}:{line}: "), messages
    assert problem in messages[0] and messages[0].endswith("skipping the run"), messages
    assert [r.path for r in runs] == [good]
    (good / "config.json").write_bytes(text)
    with pytest.warns(UserWarning) as caught, pytest.raises(AnalysisError, match=r"no usable run directory: 2 skipped"):
        load_runs([tmp_path])
    assert len(caught) == 2


def _damaged_study(root: Path) -> dict[str, str]:
    """A good run, a run with damaged lines in every log and a run with a damaged config; the
    warnings (``FILE:LINE: skipping ...``) the commands must print."""
    write_run(root, "detach", 0, n=12)
    bad = write_run(root, "occ", 0, n=12)
    metrics, decomps = bad / "metrics.jsonl", bad / "decomposition.jsonl"
    deep = _insert_line(metrics, 2, DEEP_LIST)
    text_step = _insert_line(metrics, 4, b'{"step": "x", "regime": "occ"}')
    latin1 = _insert_line(decomps, 1, b'{"step": 1, "direction": "caf\xe9"}')
    sweep = _append_edited(bad / "sweeps.jsonl", {"realized": [1.0]})
    curvature = _append_edited(bad / "curvature.jsonl", {"step": 10**400})
    seedless = write_run(root, "ce", 0, n=12)
    (seedless / "config.json").write_text('{"config": {"regime": "ce", "seed": 1e400}, "schema_version": 2}')
    return {
        f"{metrics}:{deep}: ": "skipping a line that is nested too deeply to parse",
        f"{metrics}:{text_step}: ": "skipping a record whose step is a string",
        f"{decomps}:{latin1}: ": "skipping a line that is not UTF-8 text",
        f"{bad / 'sweeps.jsonl'}:{sweep}: ": "skipping a sweep whose coefs, realized and quadratic differ in length",
        f"{bad / 'curvature.jsonl'}:{curvature}: ": "skipping a record whose step is inf",
        f"{seedless / 'config.json'}:1: ": "config seed is inf, not an integer; skipping the run",
    }


@pytest.mark.parametrize("command", ["validate", "report", pytest.param("plot", marks=pytest.mark.slow)])
def test_commands_analyse_the_good_runs_and_warn_about_the_damage(tmp_path, capsys, command):
    expected = _damaged_study(tmp_path / "runs")
    args = {"validate": [], "report": ["--out", str(tmp_path / "r.md")], "plot": ["--out", str(tmp_path / "figs")]}
    assert main([command, str(tmp_path / "runs"), *args[command]]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "Traceback" not in "\n".join(err)
    assert all(line.startswith("warning: ") for line in err), err
    for where, problem in expected.items():
        (hit,) = [line for line in err if line.startswith(f"warning: {where}")]
        assert problem in hit, hit
    assert len(err) == len(expected)
    if command == "report":
        assert "from 2 run(s)" in (tmp_path / "r.md").read_text()


def test_no_usable_run_is_one_line_and_exit_2(tmp_path):
    """In a separate process: an uncaught exception would print a traceback and exit 1."""
    for regime, config in (("occ", DEEP_LIST), ("ce", b'{"config": {"seed": 1e400}, "schema_version": 2}')):
        (write_run(tmp_path, regime, 0, n=3) / "config.json").write_bytes(config)
    out = subprocess.run([sys.executable, "-m", "decomp.training.cli", "validate", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no usable run directory: 2 skipped" in lines[0], out.stderr
    assert "config.json:1: " in lines[0] and "Traceback" not in out.stderr


def test_truncate_drops_damaged_lines_and_keeps_the_others_byte_for_byte(tmp_path):
    """A resume truncates the logs to the checkpoint's step: damaged lines are dropped, not
    fatal (they raised RecursionError or UnicodeDecodeError)."""
    good = [b'{"step":1,"text":"\xc3\xa9"}\n', b'{"step":2}\r\n', b'{"step":3}\n']
    lines = [good[0], DEEP_LIST + b"\n", DEEP_OBJECT + b"\n", good[1], b'{"step":2,"x":"\xff"}\n',
             b'{"step":' + b"1" * 5000 + b"}\n", b"[1, 2]\n", good[2], b'{"step":4}\n', b'{"step": 3']
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(lines))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [r["step"] for r in iter_jsonl(path)] == [1, 2, math.inf, 3, 4]
    assert [str(w.message).split(": ", 1)[0] for w in caught] == [f"{path}:{i}" for i in (2, 3, 5, 7, 10)]
    kept = truncate_jsonl(path, lambda r: isinstance(r.get("step"), int) and r["step"] <= 3)
    assert kept == 3 and path.read_bytes() == b"".join(good)


def _reject(constant: str) -> float:
    raise ValueError(f"not strict JSON: {constant}")


def test_probe_json_is_strict(monkeypatch, capsys):
    """``decomp probe --json`` prints ``null`` for an undefined value, not Python's ``NaN``."""
    import decomp.training.probe as probe

    records = {"ce": {"lambda_star": math.nan, "gain_hat": math.inf, "correlation": 0.5,
                      "lambda_star_reason": "penalty_unit <= 0"}}
    monkeypatch.setattr(probe, "run_probe", lambda cfg: records)
    assert main(["probe", "--json"]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=_reject)
    assert out == {"ce": {"lambda_star": None, "gain_hat": None, "correlation": 0.5,
                          "lambda_star_reason": "penalty_unit <= 0"}}
