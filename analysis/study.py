"""Run the study (or its pilot): every (task, arm, seed) into ``OUT/<task>/<label>-seed<seed>``.

    python -m analysis.study run   [--out runs/study] [--seeds 0,1] [--tasks add] [--workers 2]
    python -m analysis.study pilot [--out runs/pilot] [--workers 2]
    python -m analysis.study oracles [--out runs/oracles] [--workers 2]
    python -m analysis.study controls [--out runs/controls] [--workers 2]

Resumable: a finished run (``summary.json`` present) is kept, a killed one continues from its
checkpoint (``decomp run --resume``), so rerunning the command after a kill finishes the study.
Splittable: ``--seeds`` (and ``--tasks``) select a part, so several machines can share the
study; the report (:mod:`analysis.report`) reads any set of run directories. Each run is its own
``decomp run`` process with one torch thread; ``--workers`` of them run at once (one per core:
two multi-threaded processes on two cores slow each other many times over). Warm starts are
built first, one per (task, seed), so that no two workers train the same one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from analysis.design import CONTROLS, ORACLES, PILOT, STUDY, TASK_COST, Arm, Design

DESIGNS = {"run": STUDY, "pilot": PILOT, "oracles": ORACLES, "controls": CONTROLS}


@dataclass(frozen=True)
class Job:
    task: str
    arm: Arm
    seed: int
    out: Path
    settings: dict

    @property
    def cost(self) -> float:
        return self.arm.cost * TASK_COST.get(self.task, 1.0)

    def done(self) -> bool:
        return (self.out / "summary.json").is_file()

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "decomp.training.cli", "run", "--out", str(self.out), "--threads", "1",
               "--no-progress"]
        cmd += ["--resume"] if (self.out / "config.json").is_file() else []
        for key, value in self.settings.items():
            cmd += ["--set", f"{key}={value}"]
        return cmd


def jobs(design: Design, root: Path, seeds: Iterable[int] | None = None, tasks: Iterable[str] | None = None) -> list[Job]:
    """The design's runs, seed by seed (a part of the seeds is a part of the study)."""
    seeds = design.seeds if seeds is None else tuple(seeds)
    tasks = design.tasks if tasks is None else tuple(tasks)
    return [Job(task, arm, seed, root / task / f"{arm.label}-seed{seed}", arm.config(task, seed, design.common))
            for seed in seeds for task in tasks for arm in design.arms]


def run_job(job: Job, log_dir: Path) -> tuple[Job, float, int]:
    """One ``decomp run`` process (its output in ``log_dir``); ``(job, seconds, return code)``."""
    start = time.perf_counter()
    log = log_dir / f"{job.task}-{job.out.name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "a", encoding="utf-8") as f:
        code = subprocess.run(job.command(), stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    return job, time.perf_counter() - start, code


def warm_starts(todo: list[Job], pool: ProcessPoolExecutor, log_dir: Path) -> None:
    """Train (or load) the warm start of every (task, seed) once, before the runs share it: a
    one-step run per (task, seed) in a scratch folder (the warm start is cached by a hash of
    what determines it, which every arm shares)."""
    firsts: dict[tuple[str, int], Job] = {}
    for job in todo:
        firsts.setdefault((job.task, job.seed), job)
    scratch = [Job(j.task, Arm("warm", "detach"), j.seed, log_dir / "warm" / f"{j.task}-seed{j.seed}",
                   {"task": j.task, "seed": j.seed, "steps": 1, "decomp_every": 0}) for j in firsts.values()]
    for job in scratch:
        shutil.rmtree(job.out, ignore_errors=True)
    for future in [pool.submit(run_job, job, log_dir) for job in scratch]:
        job, _, code = future.result()
        if code != 0:
            sys.exit(f"warm start of {job.task} seed {job.seed} failed; see {log_dir}")


def execute(todo: list[Job], root: Path, workers: int) -> dict[str, float]:
    """Run ``todo`` with ``workers`` processes, a progress bar weighted by each job's cost and an
    estimate of the time left; returns each finished run's seconds."""
    from tqdm import tqdm

    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    failed: list[str] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        warm_starts(todo, pool, log_dir)
        bar = tqdm(total=sum(j.cost for j in todo), unit="run", desc="study", bar_format=(
            "{l_bar}{bar}| {n:.1f}/{total:.1f} cost units [{elapsed}<{remaining}]"))
        pending = {pool.submit(run_job, job, log_dir) for job in todo}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                job, secs, code = f.result()
                bar.update(job.cost)
                key = f"{job.task}/{job.out.name}"
                seconds[key] = secs
                if code != 0:
                    failed.append(key)
                bar.set_postfix_str(f"last {key} {secs:.0f} s", refresh=True)
        bar.close()
    if failed:
        sys.exit(f"{len(failed)} run(s) failed ({', '.join(failed)}); logs in {log_dir}; rerun to resume")
    return seconds


def machine() -> str:
    """The CPU, its core count and torch's version: which machine a session of runs used."""
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.study", description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=tuple(DESIGNS), help="the study, its pilot, the oracles' question, or occ's controls")
    ap.add_argument("--out", default=None, help="run root (default runs/study or runs/pilot)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: all of the design's)")
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default: all of the design's)")
    ap.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                    help="runs at once, one core each (default: 2, or 1 on one core)")
    args = ap.parse_args(argv)
    design = DESIGNS[args.what]
    root = Path(args.out or f"runs/{'study' if args.what == 'run' else args.what}")
    seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",") if s.strip()]
    tasks = None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    every = jobs(design, root, seeds, tasks)
    todo = [j for j in every if not j.done()]
    print(f"{args.what}: {len(every)} runs, {len(every) - len(todo)} already finished, {len(todo)} to run "
          f"with {args.workers} worker(s) under {root}", file=sys.stderr)
    start = time.perf_counter()
    seconds = execute(todo, root, args.workers) if todo else {}
    wall = time.perf_counter() - start
    timing = root / "timing.json"
    previous = json.loads(timing.read_text()) if timing.is_file() else {"runs": {}, "sessions": []}
    previous["runs"].update(seconds)
    previous["sessions"].append({"wall_seconds": wall, "runs": len(todo), "workers": args.workers,
                                 "seeds": seeds, "tasks": tasks, "machine": machine()})
    previous["design"] = {"tasks": design.tasks, "seeds": design.seeds, "common": design.common,
                          "arms": [asdict(a) for a in design.arms]}
    timing.write_text(json.dumps(previous, indent=2))
    print(f"{args.what}: {len(todo)} runs in {wall / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
