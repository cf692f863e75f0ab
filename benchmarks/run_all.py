"""Run every benchmark and write ``benchmarks/results.md`` (``make bench``).

Each benchmark runs in its own process (so one cannot warm the other's allocator) and its
output is copied into the results file under a heading, with the machine, the versions and the
date at the top and a table of the targets of the benchmarks issue. With ``--readme``, the
performance table of docs/benchmarks.md (between its ``<!-- performance:start -->`` and
``<!-- performance:end -->`` markers) is also rewritten from the results; README.md is not
touched (the flag keeps its old name).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run(args: list[str], env: dict[str, str] | None = None) -> str:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    print(f"  {' '.join(args)}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return out.stdout.strip()


def _markdown(text: str) -> str:
    """A benchmark's printout as Markdown: its title line as a note, header rows on its tables."""
    out, previous = [], ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if line.startswith("# "):
            out.append(f"*{line[2:].strip()}*")
        elif line.startswith("|") and not previous.startswith("|") and "---" not in line and "---" not in following:
            cells = line.count("|") - 1
            out += ["|" + " |" * cells, "|" + "---|" * cells, line] if cells > 0 else [line]
        else:
            out.append(line)
        previous = line
    return "\n".join(out)


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else float("nan")


def _numbers(pattern: str, text: str) -> tuple[float, ...]:
    """Every group of ``pattern``'s first match in ``text`` (nan for each when none)."""
    m = re.search(pattern, text)
    return tuple(float(g) for g in m.groups()) if m else (float("nan"),) * re.compile(pattern).groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", action="store_true", help="also rewrite docs/benchmarks.md's performance table "
                    "(between its performance markers; README.md is not touched)")
    ap.add_argument("--skip-smollm2", action="store_true", help="leave out the SmolLM2-135M measurement")
    args = ap.parse_args()
    start = time.perf_counter()
    sections = {}
    sections["occ"] = run(["occ_overhead.py"])
    sections["cost"] = run(["decomposition_cost.py"])
    if not args.skip_smollm2:
        sections["cost_smol"] = run(["decomposition_cost_smollm2.py", "--repeats", "2"])
    sections["peers"] = run(["hvp_peers.py", "--repeats", "15"])
    peers_memory = {}
    for method in ("decomp", "decomp-reverse", "decomp-forward", "double-backward", "curvlinops"):
        out = run(["hvp_peers.py", "--memory", method], MEMORY_ENV)
        peers_memory[method] = json.loads(out.splitlines()[-1])["peak_bytes"]
    sections["methods"] = run(["hvp_methods.py"])
    sections["scaling"] = run(["scaling.py"])
    sections["memory"] = run(["memory.py"])
    sections["loop"] = run(["loop_cost.py"])
    for regime in ("detach", "occ"):  # make demo's other regimes: a still and a fourth active direction
        sections[f"loop_{regime}"] = run(["loop_cost.py", "--regime", regime])
    sections["instrumented"] = run(["instrumented_cost.py"])
    sections["groups"] = run(["group_terms_cost.py"])
    sections["horizon"] = run(["horizon_cost.py"])
    if not args.skip_smollm2:
        sections["memory_smol"] = run(["memory.py", "--model", "smollm2-135m"])
        sections["loop_smol"] = run(["loop_cost.py", "--model", "smollm2-135m"])

    leanest = min(v for k, v in peers_memory.items() if not k.startswith("decomp"))
    mem_lines = ["| method | peak memory of one HVP | vs leanest peer |", "|---|---|---|"]
    for k, v in peers_memory.items():
        mem_lines.append(f"| {k} | {v / 1e6:.1f} MB | {v / leanest:.2f}× |")

    occ = _number(r"1 \+ \(estimators alone.*?\| ([\d.]+)×", sections["occ"])
    cost = _number(r"decompose, AdamW\s*\|[^=]*= ([\d.]+)×", sections["cost"])
    cost_sgd = _number(r"decompose, SGD\s*\|[^=]*= ([\d.]+)×", sections["cost"])
    cost_smol = _number(r"decompose, AdamW\s*\|[^=]*= ([\d.]+)×", sections.get("cost_smol", ""))
    cost_smol_chunks = _number(r"decompose, AdamW, J side in \d+ chunks[^|]*\|[^=]*= ([\d.]+)×",
                               sections.get("cost_smol", ""))
    floor = _number(r"floor: [^|]*\| ([\d.]+)×", sections["cost"])
    floor_smol = _number(r"floor: [^|]*\| ([\d.]+)×", sections.get("cost_smol", ""))
    peer_ratio = min(_number(rf"{p}\s*\|[^=]*= ([\d.]+)×", sections["peers"]) for p in ("double-backward", "curvlinops"))
    mem = _number(r"decompose \(AdamW\) \| [\d.]+ MB = ([\d.]+)×", sections["memory"])
    mem_inst = _number(r"instrumented update[^|]*\| [\d.]+ MB = ([\d.]+)×", sections["memory"])
    mem_inst_smol = _number(r"instrumented update[^|]*\| [\d.]+ MB = ([\d.]+)×", sections.get("memory_smol", ""))
    search = max(_number(rf"{d}:   \+ search for λ̂\s*\|[^=]*= ([\d.]+)×", sections["cost"]) for d in ("ce", "policy"))
    # the first direction's in-sample record: its jvp estimators and its decomposition (the last two
    # columns); the policy regime's active direction is policy
    row = r"{}, train record \|[^|]*\|[^|]*\| ([\d.]+)× \| ([\d.]+)×"
    loop_jvp, loop_train = _numbers(row.format("active"), sections["loop"])
    loop_jvp_smol, loop_train_smol = _numbers(row.format("policy"), sections.get("loop_smol", ""))
    whole = r"whole instrumented update, extra over a plain one[^|]*\| ([\d.]+)×"
    loop_whole, loop_whole_smol = _number(whole, sections["loop"]), _number(whole, sections.get("loop_smol", ""))
    loop_detach, loop_occ = (_number(whole, sections[f"loop_{r}"]) for r in ("detach", "occ"))
    errors_adds = _number(r"held-out 1× \(8 groups\), group_errors \| [\d.]+× \| ([+-][\d]+)%", sections["instrumented"])
    inst_1, inst_4, inst_16 = (_number(rf"held-out {k}× \(\d+ groups\), group_errors \| ([\d.]+)×", sections["instrumented"])
                               for k in (1, 4, 16))
    horizon_rows = {k: _numbers(rf"\| k = {k} \| ([\d.]+)× \[[^|]*\| \d+ \| ([\d.]+)×", sections["horizon"])
                    for k in (1, 2, 4, 8, 20)}
    slope_p = _number(r"log parameters: ([\d.]+)", sections["scaling"])
    slope_t = _number(r"log tokens: ([\d.]+)", sections["scaling"])
    ours_mem = peers_memory["decomp"] / leanest

    def ok(cond: bool) -> str:
        return "met" if cond else "**not met**"

    targets = [
        "| target | measured | |",
        "|---|---|---|",
        f"| OCC overhead ≤ 1.01× a fixed-coefficient policy update | {occ:.4f}× | {ok(occ <= 1.01)} |",
        f"| exact decomposition ≤ 4× a training update (default model, SGD: one HVP) | {cost_sgd:.2f}× | {ok(cost_sgd <= 4)} |",
        f"| exact decomposition ≤ 4× a training update (default model, AdamW: two HVPs) | {cost:.2f}× | {ok(cost <= 4)} |",
        f"| the floor under it: the passes it cannot share, each timed alone (default model, AdamW) | {floor:.2f}× | {ok(floor <= 4)} |",
        f"| exact decomposition ≤ 4× a training update (SmolLM2-135M, AdamW) | {cost_smol:.2f}× | {ok(cost_smol <= 4)} |",
        f"| the same as the loop runs SmolLM2: J's side in chunks of rows, realized changes in float64 | {cost_smol_chunks:.2f}× | {ok(cost_smol_chunks <= 4)} |",
        f"| the floor under it (SmolLM2-135M, AdamW) | {floor_smol:.2f}× | {ok(floor_smol <= 4)} |",
        f"| our HVP no slower than the fastest peer (time of the fastest peer / ours) | {peer_ratio:.2f} | {ok(peer_ratio >= 1.0)} |",
        f"| search for the realized optimum ≤ 3× a training update (default model, worst direction) | {search:.2f}× | {ok(search <= 3)} |",
        f"| in the loop: the decomposition of the policy direction's in-sample record (no search, no jvp estimators), default model | {loop_train:.2f}× | beside {cost:.2f}× above |",
        f"| in the loop: the same, SmolLM2-135M (J's side in chunks, realized changes in float64) | {loop_train_smol:.2f}× | beside {cost_smol_chunks:.2f}× above |",
        f"| in the loop: the jvp estimators of that record, default model / SmolLM2-135M | {loop_jvp:.2f}× / {loop_jvp_smol:.2f}× | |",
        f"| in the loop: the whole instrumented update (4 directions × 2 splits, the search, every estimator's gain, "
        f"errors) ≤ half of the 77–92× it cost before the errors and the grid (≤ 38.5×), default model | "
        f"{loop_whole:.1f}× | {ok(loop_whole <= 38.5)} |",
        f"| the same in a `detach` run / an `occ` run (make demo's other regimes) | {loop_detach:.1f}× / "
        f"{loop_occ:.1f}× | {ok(max(loop_detach, loop_occ) <= 38.5)} |",
        f"| the same, SmolLM2-135M (policy direction × 2 splits) | {loop_whole_smol:.1f}× | |",
        f"| sampling errors (group_errors) add ≤ 15% to an instrumented update at the default held-out size | {errors_adds:+.0f}% | {ok(errors_adds <= 15)} |",
        f"| instrumented update with errors at 1×, 4×, 16× the mini-batch's held-out groups (default model) | {inst_1:.0f}× / {inst_4:.0f}× / {inst_16:.0f}× | |",
        "| the k-step measurement of one direction on the default held-out batch, k = 1 / 2 / 4 / 8 / 20 (default "
        "model) | " + " / ".join(f"{horizon_rows[k][0]:.0f}×" for k in (1, 2, 4, 8, 20))
        + f" | {horizon_rows[4][1]:.2f}× a training update per coefficient and continued update at k = 4 |",
        f"| decomposition peak memory ≤ 3× a training update | {mem:.2f}× | {ok(mem <= 3)} |",
        f"| instrumented update as the loop runs it, peak memory (default model) | {mem_inst:.2f}× | {ok(mem_inst <= 3)} |",
        f"| instrumented update as the loop runs it, peak memory ≤ 3× (SmolLM2-135M, policy direction) | {mem_inst_smol:.2f}× | {ok(mem_inst_smol <= 3)} |",
        f"| our HVP memory ≤ leanest peer + 10% | {ours_mem:.2f}× | {ok(ours_mem <= 1.10)} |",
        f"| time ∝ parameters (log-log slope ≈ 1) | {slope_p:.2f} | sub-linear at these small sizes |",
        f"| time ∝ tokens (log-log slope ≈ 1) | {slope_t:.2f} | |",
    ]
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("torch", "numpy", "scipy", "transformers", "curvlinops-for-pytorch")
                         if _installed(p))
    header = [
        "# decomp benchmarks",
        "",
        f"Generated by `make bench` (`python benchmarks/run_all.py`) on {dt.date.today()} in "
        f"{(time.perf_counter() - start) / 60:.1f} min. Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; {versions}. Every figure is a median over repeats, with "
        "[min–max], measured as a ratio to a reference in the same process run.",
        "",
        "## Targets",
        "",
        *targets,
    ]
    body = [
        "## OCC overhead", sections["occ"],
        "## Exact decomposition against a training update", sections["cost"],
        *(["## Exact decomposition, SmolLM2-135M-Instruct", sections["cost_smol"]] if "cost_smol" in sections else []),
        "## HVP against peers: time", sections["peers"],
        "## HVP against peers: peak memory (each in a fresh process)", "\n".join(mem_lines),
        "## HVP methods against a training step", sections["methods"],
        "## Scaling", sections["scaling"],
        "## Memory of a decomposition and of an instrumented update", sections["memory"],
        *(["## Memory, SmolLM2-135M-Instruct", sections["memory_smol"]] if "memory_smol" in sections else []),
        "## Instrumentation inside the loop", sections["loop"],
        "## Instrumentation inside the loop, a detach run and an occ run",
        sections["loop_detach"] + "\n\n" + sections["loop_occ"],
        "## What precision costs: held-out size and sampling errors", sections["instrumented"],
        "## The groups' terms of an update's directions", sections["groups"],
        "## What a horizon costs: the k-step measurement", sections["horizon"],
        *(["## Instrumentation inside the loop, SmolLM2-135M-Instruct", sections["loop_smol"]]
          if "loop_smol" in sections else []),
    ]
    body = [_markdown(part) if not part.startswith("## ") else part for part in body]
    text = "\n".join(header) + "\n\n" + "\n\n".join(body) + "\n"
    (HERE / "results.md").write_text(text)
    print(f"wrote {HERE / 'results.md'}", file=sys.stderr)
    if args.readme:
        update_readme("\n".join(targets))


def _installed(name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def update_readme(targets: str) -> None:
    """The targets table between docs/benchmarks.md's performance markers."""
    page = ROOT / "docs" / "benchmarks.md"
    text = page.read_text()
    start, end = "<!-- performance:start -->", "<!-- performance:end -->"
    if start not in text or end not in text:
        sys.exit(f"{page} has no performance markers")
    block = (f"{start}\nMeasured by `make bench` on this 2-core machine ({dt.date.today()}); details, "
             f"repeats and min–max in [`benchmarks/results.md`](../benchmarks/results.md).\n\n{targets}\n{end}")
    page.write_text(text[: text.index(start)] + block + text[text.index(end) + len(end):])
    print(f"updated {page}", file=sys.stderr)


if __name__ == "__main__":
    main()
