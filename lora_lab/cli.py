"""`lora-lab` on the command line. Parses arguments, calls the library, prints; nothing else."""

from __future__ import annotations

import argparse
import csv
import sys
import warnings
from collections.abc import Sequence

from .inject import classifier_head_name
from .models import MODELS, build_model, model_spec
from .params import REPORT_DECIMALS, markdown_table, rank_report

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)
DESCRIPTION = (
    "lora_lab: LoRA fine-tuning you can read, cross-checked against Hugging Face PEFT. "
    "`lora-lab report` counts what LoRA trains and the memory it takes, at every rank, for any model."
)


def _items(values: Sequence[str]) -> list[str]:
    """A CLI list given as `8,16,64`, `8 16 64` or a mix: each item once, in order."""
    return list(dict.fromkeys(item for value in values for item in value.split(",") if item))


def _ranks(values: Sequence[str]) -> list[int]:
    ranks = []
    for item in _items(values):
        try:
            ranks.append(int(item))
        except ValueError:
            raise ValueError(f"--ranks takes whole numbers such as 8,16,64; got {item!r}") from None
    return ranks


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _report(args: argparse.Namespace) -> int:
    spec = model_spec(args.model)
    targets = _items(args.targets)
    rows = rank_report(
        lambda: build_model(args.model, "meta"),
        _ranks(args.ranks),
        "all-linear" if targets == ["all-linear"] else targets,
    )
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return 0
    model = build_model(args.model, "meta")
    head = classifier_head_name(model)
    dtypes = ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}))
    modules = _plural(int(rows[0]["lora_modules"]), "module")
    frozen = f"base frozen but the classification head {head!r}, which trains whole" if head else "base frozen"
    print(f"{spec.description}: LoRA on {modules} (targets: {', '.join(targets)}), {frozen}; counted on meta")
    print(f"memory in MiB: weights as stored ({dtypes}), gradients and AdamW state of the trainable ones\n")
    print(markdown_table(rows, REPORT_DECIMALS))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-lab", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = sub.add_parser(
        "report",
        help="trainable parameters and memory of LoRA at several ranks",
        description="Count total and trainable parameters, and training memory, for a list of LoRA ranks. "
        "The model is built on the meta device: nothing is allocated or downloaded, a 3B model takes seconds.",
    )
    report.add_argument(
        "--model",
        default="gpt2-124m",
        help=f"one of {', '.join(MODELS)}, or a directory holding a Hugging Face config.json (default: gpt2-124m)",
    )
    report.add_argument(
        "--ranks",
        nargs="+",
        default=[",".join(map(str, DEFAULT_RANKS))],
        metavar="R",
        help=f"LoRA ranks, as 8,16,64 or 8 16 64 (default: {','.join(map(str, DEFAULT_RANKS))})",
    )
    report.add_argument(
        "--targets",
        nargs="+",
        default=["all-linear"],
        metavar="NAME",
        help="module names or dotted suffixes (q_proj,v_proj), or all-linear: every linear but the output head "
        "(default: all-linear)",
    )
    report.add_argument("--format", choices=["table", "csv"], default="table", help="markdown table (default) or CSV")
    report.set_defaults(run=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            code = args.run(args)
        except (ValueError, TypeError, OSError) as err:  # bad input, or a file or hub model not found
            print(f"lora-lab {args.command}: error: {err}", file=sys.stderr)
            code = 2
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
        print(f"lora-lab {args.command}: warning: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
