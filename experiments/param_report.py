"""Trainable parameters and training memory of LoRA across ranks and model sizes.

Builds every model on the meta device (nothing allocated), so it runs offline in seconds, 3B
models included. Writes experiments/results/param_report.csv and .md.

    python experiments/param_report.py [--models gpt2-124m openllama-3b] [--ranks 1 8 64]
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from lora_lab.files import write_text
from lora_lab.models import MODELS, build_model
from lora_lab.params import REPORT_DECIMALS, markdown_table, rank_report

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--targets", nargs="+", default=["all-linear"])
    parser.add_argument("--out", type=Path, default=RESULTS / "param_report")
    args = parser.parse_args()
    targets = "all-linear" if args.targets == ["all-linear"] else args.targets

    rows = []
    for name in args.models:
        for row in rank_report(lambda name=name: build_model(name), args.ranks, targets):
            rows.append({"model": name, **row})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(args.out.with_suffix(".csv"), buffer.getvalue())
    header = f"LoRA on {', '.join(args.targets)}, base frozen; memory in MiB (weights, grads, AdamW)\n\n"
    write_text(args.out.with_suffix(".md"), header + markdown_table(rows, REPORT_DECIMALS) + "\n")
    print(markdown_table(rows, REPORT_DECIMALS))


if __name__ == "__main__":
    main()
