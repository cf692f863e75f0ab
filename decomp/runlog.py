"""JSON-lines run logs: one flushed line per record, strict JSON, tolerant reading.

Non-finite floats are written as ``null`` (strict JSON, readable by jq and pandas) and read back
as ``nan``. A line that does not parse (a run killed mid-write) is skipped with a warning naming
the file and line.
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


def iter_jsonl(path: Path, *, warn: bool = True, required: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Records of a ``.jsonl`` file; unparsable lines and records missing a ``required`` field
    are skipped (with a warning naming the file and line)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                problem = "skipping a line that is not valid JSON (truncated?)"
            else:
                missing = [k for k in required if k not in record] if isinstance(record, dict) else []
                if not isinstance(record, dict):
                    problem = "skipping a line that is not a JSON object"
                elif missing:
                    problem = f"skipping a record missing {', '.join(missing)}"
                else:
                    yield {k: (math.nan if v is None else v) for k, v in record.items()}
                    continue
            if warn:
                warnings.warn(f"{path}:{lineno}: {problem}", stacklevel=2)


def read_jsonl(path: Path, *, warn: bool = True) -> list[dict[str, Any]]:
    return list(iter_jsonl(path, warn=warn))


def truncate_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool]) -> int:
    """Rewrite ``path`` (atomically) with only the valid records ``keep`` accepts; return how many."""
    path = Path(path)
    if not path.exists():
        return 0
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and keep(record):
                kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept), encoding="utf-8"))
    return len(kept)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``:
    a reader (or a run killed mid-write) sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented strict JSON (non-finite floats as ``null``), written atomically."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False))
