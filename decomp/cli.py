"""Command line: ``decomp probe`` (and, with the reference run, ``run``/``compare``)."""

from __future__ import annotations

import argparse
import json
import sys

from decomp import __version__


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decomp",
        description="Exact correlation/penalty decomposition of MTP losses in RLVR, and OCC estimators.",
    )
    parser.add_argument("--version", action="version", version=f"decomp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser(
        "probe",
        help="one instrumented update of the built-in model on a synthetic batch",
        description="Decompose the ce and policy MTP directions at one real AdamW step of the built-in "
        "tiny model on a synthetic batch, and compare every OCC estimator with the exact λ*.",
    )
    probe.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    probe.add_argument("--prompts", type=_positive_int, default=4, help="prompts per batch (default 4)")
    probe.add_argument("--group-size", type=_positive_int, default=8, help="samples per prompt G (default 8)")
    probe.add_argument("--lr", type=_nonnegative_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    probe.add_argument("--coef", type=float, default=0.1, help="MTP coefficient c (default 0.1)")
    probe.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "probe":
        from decomp.probe import ProbeConfig, format_probe, run_probe

        try:
            records = run_probe(
                ProbeConfig(
                    seed=args.seed, prompts=args.prompts, group_size=args.group_size, lr=args.lr, coef=args.coef
                )
            )
        except (ValueError, TypeError) as err:
            print(f"decomp probe: error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(records, indent=2) if args.json else format_probe(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
