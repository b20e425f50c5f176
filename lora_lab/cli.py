"""`lora-lab` on the command line. Parses arguments, calls the library, prints; nothing else."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence

from .models import MODELS, build_model, model_spec
from .params import markdown_table, rank_report

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)


def _report(args: argparse.Namespace) -> int:
    spec = model_spec(args.model)
    targets = args.targets[0] if args.targets == ["all-linear"] else args.targets
    rows = rank_report(lambda: build_model(args.model, "meta"), args.ranks, targets)
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return 0
    print(
        f"{spec.description}: LoRA on {rows[0]['lora_modules']} modules "
        f"(targets: {', '.join(args.targets)}), base frozen, counted on the meta device"
    )
    print("memory in MiB: weights as stored, gradients and AdamW state of the trainable ones\n")
    print(markdown_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser(
        "report",
        help="trainable parameters and memory of LoRA at several ranks",
        description="Count total and trainable parameters for a list of LoRA ranks. Builds the "
        "model on the meta device: offline, instant, any size.",
    )
    report.add_argument(
        "--model", default="gpt2-124m", help=f"one of {', '.join(MODELS)}, or a Hugging Face config directory"
    )
    report.add_argument("--ranks", type=int, nargs="+", default=list(DEFAULT_RANKS))
    report.add_argument(
        "--targets",
        nargs="+",
        default=["all-linear"],
        help="module names or dotted suffixes, or 'all-linear' (default)",
    )
    report.add_argument("--format", choices=["table", "csv"], default="table")
    report.set_defaults(run=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as err:  # bad input, or a file or hub model not found
        print(f"lora-lab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
