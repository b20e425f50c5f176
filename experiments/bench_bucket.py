"""Length-bucketed batches against plain shuffled ones, on a real task: the padding each carries and the
real tokens per second of `lora-lab train` (all-MiniLM-L6-v2 on SMS spam, the sms-minilm settings, one epoch).

    python experiments/bench_bucket.py

Writes experiments/results/bench_bucket.md with the command, the machine and the wall time.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from finetune import SPAM, header  # noqa: E402

from lora_lab import data as D  # noqa: E402
from lora_lab.files import write_text  # noqa: E402
from lora_lab.run import prepare, train  # noqa: E402


def padding(cfg) -> tuple[float, int]:
    """(padded positions over all positions, number of batches) of one epoch's training batches."""
    dataset, loaded = prepare(cfg)
    batches = D.batches(
        dataset.train, cfg.batch_size, cfg.make_task(loaded.kind).collate(loaded.tokenizer), True, cfg.seed, cfg.bucket
    )
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    return 1 - real / total, len(batches)


def main() -> None:
    start = time.perf_counter()
    rows = []
    for bucket in (False, True):
        cfg = dataclasses.replace(SPAM, epochs=1, bucket=bucket)
        pad, count = padding(cfg)
        with tempfile.TemporaryDirectory() as run:
            m = train(cfg, run)
        rows.append((bucket, pad, count, m))
    text = header("Length-bucketed batches: MiniLM on SMS spam, one epoch", time.perf_counter() - start)
    text += "| batches | padding | real tokens/s | train seconds | test accuracy |\n|---|---:|---:|---:|---:|\n"
    for bucket, pad, count, m in rows:
        name = "bucketed by length" if bucket else "shuffled"
        text += f"| {name} ({count}) | {100 * pad:.1f}% | {m['tokens_per_second']:,.0f} | {m['train_seconds']:.1f} | "
        text += f"{100 * m['test_accuracy']:.2f}% |\n"
    write_text(HERE / "results" / "bench_bucket.md", text)
    print(text)


if __name__ == "__main__":
    main()
