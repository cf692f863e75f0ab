"""The docs' settings lists name every config field, with the code's defaults.

Format the test reads (docs/reference-run.md, docs/run-directory.md, docs/trl.md): a marker line

    <!-- settings: CLASS -->

(``CLASS`` one of ``TrainConfig``, ``MTPConfig``, ``InstrumentConfig``), then, after at most
blank lines, a Markdown table. The table's header names its columns; the test reads two of
them:

- ``field`` (or ``fields``): the field names, each in backticks; one row may name several
  (``| `beta1`, `beta2` | 0.9, 0.999 | ... |``);
- ``default`` (optional column): the default, as ``--set`` takes it: a string in backticks
  (```detach```, ```""``` for the empty string), a number (``0.1``, ``1e-6``), ``true`` or
  ``false``. A row naming several fields gives one default per field, comma-separated in the
  same order, or one default shared by all of them. An empty cell or ``—`` states none.

Every other column (the meaning, a group name) is for people. For each marker, the set of names
in the table must equal the class's ``dataclasses.fields``, each name listed once, and every
stated default must equal the field's default. docs/trl.md needs the markers
``<!-- settings: MTPConfig -->`` and ``<!-- settings: InstrumentConfig -->`` before its two
tables, and ``oracle_bound`` in the first.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest

from decomp.config import InstrumentConfig, MTPConfig
from decomp.training.config import TrainConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"
CLASSES = {"TrainConfig": TrainConfig, "MTPConfig": MTPConfig, "InstrumentConfig": InstrumentConfig}
MARKER = re.compile(r"^<!--\s*settings:\s*(\w+)\s*-->\s*$")
NAME = re.compile(r"`([^`]+)`")

# (doc, class): the settings lists the docs must keep complete
LISTS = [
    ("reference-run.md", "TrainConfig"),
    ("run-directory.md", "TrainConfig"),
    ("trl.md", "MTPConfig"),
    ("trl.md", "InstrumentConfig"),
]


def _cells(line: str) -> list[str]:
    """A table row's cells (``\\|`` is a pipe inside a cell, as in GitHub's tables)."""
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def settings_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """``{class name: rows}`` of every marked table in ``text``; each row maps the lower-cased
    header to the cell."""
    lines = text.splitlines()
    tables: dict[str, list[dict[str, str]]] = {}
    for i, line in enumerate(lines):
        m = MARKER.match(line.strip())
        if not m:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        assert j + 1 < len(lines) and lines[j].lstrip().startswith("|"), f"marker {m[1]}: no table follows"
        header = [h.lower() for h in _cells(lines[j])]
        assert re.fullmatch(r"[\s|:-]+", lines[j + 1]), f"marker {m[1]}: the table has no separator row"
        rows = []
        for row in lines[j + 2 :]:
            if not row.lstrip().startswith("|"):
                break
            cells = _cells(row)
            assert len(cells) == len(header), f"marker {m[1]}: row {row!r} has {len(cells)} cells, not {len(header)}"
            rows.append(dict(zip(header, cells, strict=True)))
        assert m[1] not in tables, f"two tables are marked {m[1]}"
        tables[m[1]] = rows
    return tables


def documented(rows: list[dict[str, str]]) -> list[tuple[str, str | None]]:
    """``(name, default cell or None)`` of every field a settings table names, in order."""
    out: list[tuple[str, str | None]] = []
    for row in rows:
        column = next((k for k in ("field", "fields") if k in row), None)
        assert column is not None, f"a settings table needs a 'field' column, has {sorted(row)}"
        names = NAME.findall(row[column])
        assert names, f"row without a field name in backticks: {row}"
        cell = row.get("default", "").strip()
        if cell in ("", "—", "-"):
            out.extend((n, None) for n in names)
            continue
        parts = [p.strip() for p in cell.split(",")] if len(names) > 1 else [cell]
        if len(parts) == 1:
            parts = parts * len(names)  # one default shared by all the names
        assert len(parts) == len(names), f"{names}: {len(parts)} defaults for {len(names)} fields ({cell!r})"
        out.extend(zip(names, parts, strict=True))
    return out


def default_matches(cell: str, default: Any) -> bool:
    """Whether a documented default equals the dataclass default (format: module docstring)."""
    quoted = re.fullmatch(r"`(.*)`", cell)
    text = quoted[1] if quoted else cell
    if isinstance(default, bool):
        return text.lower() == str(default).lower()
    if isinstance(default, (int, float)):
        try:
            return math.isclose(float(text), float(default), rel_tol=1e-12, abs_tol=0.0)
        except ValueError:
            return False
    if isinstance(default, str):
        return (text == "" or text == '""') if default == "" else text == default
    return text == str(default)


@pytest.mark.parametrize("doc,cls_name", LISTS, ids=[f"{d}:{c}" for d, c in LISTS])
def test_settings_list_names_every_field_with_its_default(doc, cls_name):
    tables = settings_tables((DOCS / doc).read_text(encoding="utf-8"))
    assert cls_name in tables, f"docs/{doc} has no table marked <!-- settings: {cls_name} -->"
    rows = documented(tables[cls_name])
    names = [n for n, _ in rows]
    twice = sorted({n for n in names if names.count(n) > 1})
    assert not twice, f"docs/{doc}: listed more than once: {twice}"
    fields = {f.name: f.default for f in dataclasses.fields(CLASSES[cls_name])}
    assert set(names) == set(fields), (
        f"docs/{doc} ({cls_name}): missing {sorted(set(fields) - set(names))}, "
        f"not fields {sorted(set(names) - set(fields))}")
    wrong = [f"{n}: documented {cell}, code {fields[n]!r}" for n, cell in rows
             if cell is not None and not default_matches(cell, fields[n])]
    assert not wrong, f"docs/{doc} ({cls_name}): wrong defaults: {wrong}"


def test_the_parser_reads_the_documented_format():
    text = """
<!-- settings: MTPConfig -->

| field | default | meaning |
|---|---|---|
| `regime` | `detach` | a regime |
| `mtp_scale`, `mtp_depth` | 0.1, 1 | two at once |
| `occ_estimator` | `masked` | x |
| `policy_form` | — | none stated |
| `mtp_init`, `oracle_bound` |  | none stated, `\\|λ\\|` |

<!-- settings: InstrumentConfig -->
| group | fields |
|---|---|
| a group with `code` | `sweep_every`, `curvature_every` |
"""
    tables = settings_tables(text)
    rows = documented(tables["MTPConfig"])
    assert rows == [("regime", "`detach`"), ("mtp_scale", "0.1"), ("mtp_depth", "1"), ("occ_estimator", "`masked`"),
                    ("policy_form", None), ("mtp_init", None), ("oracle_bound", None)]
    assert documented(tables["InstrumentConfig"]) == [("sweep_every", None), ("curvature_every", None)]
    assert documented(settings_tables("<!-- settings: X -->\n| fields | default |\n|-|-|\n| `a`, `b` | 50 |\n")["X"]) \
        == [("a", "50"), ("b", "50")]
    assert default_matches("`detach`", "detach") and not default_matches("detach-inputs", "detach")
    assert default_matches('`""`', "") and default_matches("true", True) and not default_matches("false", True)
    assert default_matches("1e6", 1e6) and default_matches("1e-8", 1e-8) and not default_matches("0.2", 0.3)
    assert default_matches("`active,ce,policy,distill-joint`", "active,ce,policy,distill-joint")
