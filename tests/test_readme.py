"""The README's Python example runs as written (```python blocks; ```py marks sketches)."""

from __future__ import annotations

import math
import re
from pathlib import Path


def test_readme_python_example_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    dec = namespace["dec"]
    assert math.isfinite(dec.correlation) and math.isfinite(dec.realized)
    assert dec.optimizer == "adamw"
