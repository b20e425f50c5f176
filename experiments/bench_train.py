"""End to end: real tokens per second of the training loop behind `lora-lab train` (`train.fit`:
batching, autocast, clipping, AdamW, schedule) driving a lora_lab model and the same loop driving a
PEFT model with the same adapter, side by side in one process, and the peak memory of each.

Cases (real weights, real data):
  minilm-sms           all-MiniLM-L6-v2 on SMS spam, r=8 on query/key/value/dense, head whole,
                       batch 16 (the sms-minilm settings of experiments/finetune.py)
  smollm2-instructions SmolLM2-135M-Instruct on the book's instruction set, r=16 on all linears,
                       batch 8, 256 tokens (needs --data-path, or downloads it)

Each round trains every variant for --steps optimizer steps on the same batches (one fit call each,
order reversed every other round); tokens/s is real (unpadded) tokens over training seconds, the
ratio is the median over rounds of lora_lab's time over PEFT's in the same round. Peak memory (peak
RSS on CPU, CUDA's peak on GPU) comes from a separate process per variant, as one process's peak
would hold every variant's.

    python experiments/bench_train.py --case minilm-sms
    python experiments/bench_train.py --case smollm2-instructions --data-path ../shared/data/instruction-data.json

Writes experiments/results/bench_train_<case>_<device>.{csv,md} with the command, the machine and the wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from finetune import SPAM, header  # noqa: E402

from lora_lab import data as D  # noqa: E402
from lora_lab import export_peft_adapter  # noqa: E402
from lora_lab.config import TrainConfig  # noqa: E402
from lora_lab.files import write_csv, write_text  # noqa: E402
from lora_lab.loop import fit  # noqa: E402
from lora_lab.models import load_pretrained  # noqa: E402
from lora_lab.params import peak_memory_mib, reset_peak_memory  # noqa: E402
from lora_lab.report import markdown_table  # noqa: E402
from lora_lab.run import prepare  # noqa: E402

CASES = {
    "minilm-sms": SPAM,
    "smollm2-instructions": TrainConfig(
        model="smollm2-135m", dataset="instructions", rank=16, alpha=32, batch_size=8, lr=5e-4, max_length=256
    ),  # fmt: skip
}
VARIANTS = ("lora_lab", "peft")


def models(cfg: TrainConfig, device: torch.device, variants=VARIANTS):
    """(dataset, loaded, {variant: model}): lora_lab's as `train` prepares it, PEFT's on a second copy of
    the base with lora_lab's adapter exported into it. PEFT alone (its memory, in a child process) is
    PEFT's own initialisation of the same config, so that no lora_lab model is held beside it."""
    import peft

    def base(dataset):
        return load_pretrained(
            cfg.model, cfg.task(), num_labels=len(getattr(dataset, "labels", [])), max_length=cfg.max_length,
            device=device,
        )  # fmt: skip

    if "lora_lab" not in variants:
        dataset = D.load_dataset(cfg.dataset, cfg.data_path, cfg.seed, cfg.text_column, cfg.label_column, cfg.balanced)
        loaded = base(dataset)
        config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=cfg.targets,
                                 modules_to_save=[loaded.head] if loaded.head else None)  # fmt: skip
        return dataset, loaded, {"peft": peft.get_peft_model(loaded.model, config)}
    dataset, loaded = prepare(cfg, device)
    built = {"lora_lab": loaded.model}
    if "peft" in variants:
        with tempfile.TemporaryDirectory() as tmp:
            export_peft_adapter(loaded.model, tmp, extra=[loaded.head] if loaded.head else [])
            built["peft"] = peft.PeftModel.from_pretrained(base(dataset).model, tmp, is_trainable=True)
    return dataset, loaded, built


def train_some(model, dataset, loaded, cfg: TrainConfig, device: torch.device, steps: int):
    """(real tokens, seconds) of `steps` optimizer steps of `fit` on the first batches of epoch 1."""
    short = dataclasses.replace(cfg, epochs=1, max_steps=steps)
    task = cfg.make_task(loaded.kind)
    fitted = fit(model, dataset.train, task.collate(loaded.tokenizer), [], short, task, device)
    return fitted.tokens, fitted.seconds


def memory_of(variant: str, args: argparse.Namespace) -> float:
    """Peak memory (MiB) of loading and training `variant` alone, in a fresh process."""
    cmd = [sys.executable, __file__, "--case", args.case, "--device", args.device, "--steps", str(args.steps),
           "--memory-of", variant] + (["--data-path", args.data_path] if args.data_path else [])  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=list(CASES), default="minilm-sms")
    parser.add_argument("--data-path", help="the instruction set's JSON (default: download it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per variant and round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = dataclasses.replace(CASES[args.case], data_path=args.data_path, device=args.device)

    if args.memory_of:  # the child process of memory_of
        reset_peak_memory(device)
        dataset, loaded, built = models(cfg, device, [args.memory_of])
        train_some(built[args.memory_of], dataset, loaded, cfg, device, args.steps)
        print(json.dumps({"peak_mib": peak_memory_mib(device)}))
        return

    started = time.perf_counter()
    dataset, loaded, built = models(cfg, device)
    for model in built.values():  # warm-up outside the timed rounds
        train_some(model, dataset, loaded, cfg, device, 2)
    tokens = {name: [] for name in built}
    seconds = {name: [] for name in built}
    names = list(built)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            n, s = train_some(built[name], dataset, loaded, cfg, device, args.steps)
            tokens[name].append(n)
            seconds[name].append(s)
    rows = []
    for name in names:
        ratios = [a / b for a, b in zip(seconds[name], seconds["peft"], strict=True)]
        rows.append(
            {
                "variant": name,
                "tokens_per_second": sum(tokens[name]) / sum(seconds[name]),
                "seconds_per_step": statistics.median(seconds[name]) / args.steps,
                "time_vs_peft": statistics.median(ratios),
                "peak_mib": memory_of(name, args),
            }
        )
    title = f"End-to-end training throughput: {args.case}, lora_lab against PEFT in one loop"
    text = header(title, time.perf_counter() - started)
    text += (
        f"{args.rounds} rounds x {args.steps} optimizer steps per variant (batch {cfg.batch_size}, r={cfg.rank}), "
        "after 2 warm-up steps; time_vs_peft: median over rounds of the time over PEFT's in the same round; peak_mib: "
        "peak RSS (CPU) or CUDA peak of the variant alone in a fresh process, loading included.\n\n"
    )
    text += markdown_table(rows) + "\n"
    tag = "cuda" if device.type == "cuda" else "cpu"
    write_csv(args.out / f"bench_train_{args.case}_{tag}.csv", rows)
    write_text(args.out / f"bench_train_{args.case}_{tag}.md", text)
    print(text)


if __name__ == "__main__":
    main()
