"""JSON-lines run logs: one flushed line per record, strict JSON, tolerant reading.

Non-finite floats are written as ``null`` (strict JSON, readable by jq and pandas) and read back
as ``nan``. A line that does not parse (a run killed mid-write, bytes that are not UTF-8, nesting
too deep for the parser) is skipped with a warning naming the file and line: a run directory is
untrusted input, and one damaged line costs that line only.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2  # 2: split, same_as, λ̂ and realized gains in decomposition records
# a run directory's description when a trainer's own config.json sits beside it (decomp.integrations)
RUN_FILE = "decomp_run.json"


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth of dicts and lists) replaced by ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(record: dict[str, Any]) -> str:
    """One strict-JSON line for ``record`` (``nan``/``inf`` become ``null``)."""
    return json.dumps(json_safe(record), allow_nan=False, separators=(",", ":"))


class JsonlWriter:
    """Appends records to a ``.jsonl`` file, flushing after each line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


INT_BOUND = 2**63  # integers read outside ±INT_BOUND become floats (inf beyond the float range)


def _parse_int(text: str) -> int | float:
    """An integer literal read from a log: an ``int`` within ±2**63, else a ``float``. Every
    number read then fits numpy's int64 or a float (``math.isfinite(10**400)`` raises
    ``OverflowError``), and a literal of thousands of digits never reaches ``int()``, whose
    digit limit raises a ``ValueError`` that is no ``JSONDecodeError``."""
    if len(text) <= 20:  # an int64 has at most 19 digits and a sign
        value = int(text)
        if -INT_BOUND <= value < INT_BOUND:
            return value
    return float(text)


NOT_JSON = "not valid JSON"


class BadJSON(ValueError):
    """Bytes that hold no JSON value: ``problem`` says why, ``lineno`` where (1-based), ``detail``
    the parser's own words (``""`` when it has none)."""

    def __init__(self, problem: str, lineno: int = 1, detail: str = "") -> None:
        super().__init__(f"line {lineno}: {problem}" + (f" ({detail})" if detail else ""))
        self.problem = problem
        self.lineno = lineno
        self.detail = detail


def parse_json(data: bytes) -> Any:
    """The JSON value of untrusted UTF-8 ``data`` (integers as :func:`_parse_int` reads them).

    Every way the bytes can fail is one :class:`BadJSON`: bytes that are not UTF-8 (with the
    line of the first bad byte), text that is not JSON, and nesting deeper than the
    interpreter's recursion limit (``json`` raises ``RecursionError``, which no ``except
    ValueError`` of a caller would catch).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        start = data.rfind(b"\n", 0, err.start) + 1
        raise BadJSON("not UTF-8 text", data.count(b"\n", 0, err.start) + 1,
                      f"byte 0x{data[err.start]:02x} at byte {err.start - start + 1} of the line") from None
    try:
        return json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as err:
        raise BadJSON(NOT_JSON, err.lineno, f"{err.msg} at column {err.colno}") from None
    except RecursionError:
        raise BadJSON("nested too deeply to parse") from None
    except ValueError:  # any other refusal of the parser
        raise BadJSON(NOT_JSON) from None


def iter_jsonl(
    path: Path,
    *,
    warn: bool = True,
    required: tuple[str, ...] = (),
    check: Callable[[dict[str, Any]], str | None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Records of a ``.jsonl`` file, ``null`` read as ``nan``. The file is read as bytes, line by
    line, so that one damaged line loses that line only: lines :func:`parse_json` rejects or that
    are not objects, records missing a ``required`` field and records ``check`` finds a problem
    with (it returns what to say after "skipping ", else ``None``) are skipped, each with a
    warning naming the file and line."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record, problem = _read_record(line, required, check)
            if record is not None:
                yield record
            elif warn:
                warnings.warn(f"{path}:{lineno}: skipping {problem}", stacklevel=2)


def _read_record(line: bytes, required: tuple[str, ...], check: Callable[[dict[str, Any]], str | None] | None
                 ) -> tuple[dict[str, Any] | None, str]:
    """One line as a record (``null`` read as ``nan``, as ``check`` sees it), or ``None`` and
    why it is skipped."""
    try:
        value = parse_json(line)
    except BadJSON as err:
        return None, f"a line that is {err.problem}" + (" (truncated?)" if err.problem == NOT_JSON else "")
    if not isinstance(value, dict):
        return None, "a line that is not a JSON object"
    missing = [k for k in required if k not in value]
    if missing:
        return None, f"a record missing {', '.join(missing)}"
    record = {k: (math.nan if v is None else v) for k, v in value.items()}
    problem = check(record) if check is not None else None
    return (None, problem) if problem else (record, "")


def read_jsonl(path: Path, *, warn: bool = True) -> list[dict[str, Any]]:
    return list(iter_jsonl(path, warn=warn))


def truncate_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool]) -> int:
    """Rewrite ``path`` (atomically) with only the valid records ``keep`` accepts; return how many.
    Lines that :func:`parse_json` rejects (a kill mid-write, bytes that are not UTF-8, nesting too
    deep) or that are not objects are dropped; kept lines are copied byte for byte."""
    path = Path(path)
    if not path.exists():
        return 0
    kept = []
    with open(path, "rb") as f:
        for line in f:
            try:
                record = parse_json(line)
            except BadJSON:
                continue
            if isinstance(record, dict) and keep(record):
                kept.append(line if line.endswith(b"\n") else line + b"\n")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"".join(kept)))
    return len(kept)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``:
    a reader (or a run killed mid-write) sees the old file or the new one, never half of one.

    The file's data and then the folder's entry are flushed to disk (``fsync``) before and after
    the rename, so a power loss cannot leave a renamed but empty file. The temporary file is
    ``.<name>.<random>.tmp``: removed on any exception here, and recognisable
    (:func:`decomp.training.rundir.is_temporary`) when a kill left it behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, directory=True)


def _fsync(path: Path | str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented strict JSON (non-finite floats as ``null``), written atomically."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False))
