"""LoRA training-step and inference cost on GPT-2 124M: lora_lab against PEFT and full fine-tuning,
measured side by side in one run, reported as ratios.

Variants (the six linears of every block, r=8, alpha=16, AdamW):
  full                   every parameter trains (the baseline LoRA is meant to beat on memory)
  lora_lab               our LinearWithLoRA (adds the branch into the base output in place)
  lora_lab_out_of_place  the same with an ordinary `base + lora` add, to price the in-place add
  peft                   Hugging Face PEFT's LoRA on the same model and targets
and forward-only inference: the frozen base alone, lora_lab unmerged, lora_lab merged.

Before timing, a check that lora_lab and PEFT compute the same logits on this device.

    python experiments/bench_lora.py                       # CPU, small shapes
    python experiments/bench_lora.py --device cuda --batch 8 --seq 512 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from lora_lab import (
    GPT2_CONFIGS,
    GPTModel,
    export_peft_adapter,
    inject_lora,
    lora_targets,
    mark_only_lora_trainable,
    merge_lora,
)
from lora_lab.files import write_text
from lora_lab.lora import lora_modules
from lora_lab.params import markdown_table

RESULTS = Path(__file__).parent / "results"
PEFT_TARGETS = ["W_query", "W_key", "W_value", "out_proj", "layers.0", "layers.2"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    """Median milliseconds of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def _lora_model(base: GPTModel) -> GPTModel:
    model = copy.deepcopy(base)
    inject_lora(model, lora_targets("attn+ffn"), rank=8, alpha=16)
    mark_only_lora_trainable(model)
    with torch.no_grad():  # a trained-looking adapter, so merged and unmerged differ from the base
        for _, w in lora_modules(model):
            w.lora.B.normal_(std=0.01)
    return model


def _peft_model(lora: GPTModel, base: GPTModel):
    import peft

    with tempfile.TemporaryDirectory() as tmp:
        export_peft_adapter(lora, tmp)
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp, is_trainable=True)


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(device):
        base = GPTModel(GPT2_CONFIGS["gpt2-124m"]).eval()
    ids = torch.randint(0, 50257, (args.batch, args.seq + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    lora = _lora_model(base)
    peft_model = _peft_model(lora, base)
    with torch.no_grad():
        diff = (_logits(lora(x[:1])) - _logits(peft_model(x[:1]))).abs().max().item()
    print(f"lora_lab vs PEFT logits on {device} (fp32): max abs diff {diff:.2e}")
    assert diff <= 1e-3, "lora_lab and PEFT disagree"
    explicit = copy.deepcopy(base)
    for block in explicit.trf_blocks:
        block.att.use_sdpa = False
    with torch.no_grad(), autocast:
        fast, slow = base(x[:1]).float(), explicit(x[:1]).float()
    rel = ((fast - slow).norm() / slow.norm()).item()
    print(f"SDPA vs explicit-mask attention on {device} ({args.dtype}): relative error {rel:.2e}")
    del explicit

    out_of_place = copy.deepcopy(lora)
    for _, w in lora_modules(out_of_place):
        w._add_in_place = False
    full = copy.deepcopy(base).requires_grad_(True)
    train_variants = {"full": full, "lora_lab": lora, "lora_lab_out_of_place": out_of_place, "peft": peft_model}

    rows = []
    for name, model in tqdm(train_variants.items(), desc="training steps"):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step(model=model, opt=opt) -> None:
            with autocast:
                logits = _logits(model(x))
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        # Memory a step adds on top of what is resident (every variant's weights): activations,
        # gradients and optimizer state. CUDA only; the CPU allocator keeps no such count.
        resident = 0
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        ms = _time(step, device, args.warmup, args.steps)
        extra = (torch.cuda.max_memory_allocated(device) - resident) / 2**20 if device.type == "cuda" else float("nan")
        trainable = sum(p.numel() for p in params)
        rows.append({"variant": name, "mode": "train step", "trainable": trainable, "ms": ms, "step_mib": extra})
        model.eval()
        del opt

    merged = copy.deepcopy(lora)
    merge_lora(merged)
    infer_variants = {"base (no LoRA)": base, "lora_lab unmerged": lora, "lora_lab merged": merged}
    for name, model in tqdm(infer_variants.items(), desc="inference"):

        @torch.no_grad()
        def forward(model=model) -> None:
            with autocast:
                model(x)

        rows.append(
            {
                "variant": name,
                "mode": "forward",
                "trainable": 0,
                "ms": _time(forward, device, args.warmup, args.steps),
                "step_mib": float("nan"),
            }
        )

    # ratio: time over lora_lab's for training steps, over the frozen base's for the forward
    reference = {"train step": "lora_lab", "forward": "base (no LoRA)"}
    ref_ms = {mode: next(r["ms"] for r in rows if r["variant"] == v) for mode, v in reference.items()}
    for r in rows:
        r["ratio"] = r["ms"] / ref_ms[r["mode"]]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    rows = run(args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    tag = f"{'cuda' if args.device.startswith('cuda') else 'cpu'}_{args.dtype}"
    header = (
        f"GPT-2 124M, LoRA r=8 on the six block linears, AdamW; batch {args.batch} x {args.seq} tokens, "
        f"{args.dtype}, {device}, torch {torch.__version__}; median of {args.steps} after {args.warmup} "
        "warm-up. step_mib: memory a training step adds over the resident weights (CUDA only). ratio: time over "
        "lora_lab's (training) or over the base model's (forward).\n\n"
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(args.out / f"bench_lora_{tag}.csv", buffer.getvalue())
    write_text(args.out / f"bench_lora_{tag}.md", header + markdown_table(rows) + "\n")
    print(header + markdown_table(rows))


if __name__ == "__main__":
    main()
