"""Memory and speed of LoRA and QLoRA on the OpenLLaMA 3B architecture (random init: no weights needed),
lora_lab and PEFT + bitsandbytes side by side on the same base in one run.

Variants, each at every rank given (default r = 8 and 64, all seven linears of every layer, alpha = 2r):
  lora_lab bf16     the base in bf16, LoRA (fp32) on it
  lora_lab nf4      QLoRA: the base's linears in bitsandbytes NF4 (double quantization), compute in bf16
  peft bf16 / nf4   PEFT's LoRA on the same base
  floor bf16 / nf4  no adapters, the base frozen, gradients through the activations only: what any LoRA
                    step must at least cost (vs_floor: each step's time over it, on the same base)
  --paged           adds lora_lab with bitsandbytes' PagedAdamW (optimizer state in paged memory; CUDA)
One micro-batch of 1 x 512 random tokens per step, gradient checkpointing, AdamW, bf16 autocast. Peak memory
is torch.cuda.max_memory_allocated over the timed steps (weights, LoRA, optimizer state, activations).

    python experiments/qlora_3b.py                 # GPU: ~5 min on an H100
    python experiments/qlora_3b.py --tiny          # a two-layer Llama on the CPU: checks that it runs, times nothing

Results go to experiments/results/qlora_3b_<device>.{csv,md}, with the device named.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
from pathlib import Path

import torch

from lora_lab import inject_lora, mark_only_lora_trainable
from lora_lab.files import write_csv, write_text
from lora_lab.models import quantize_linears
from lora_lab.params import count_parameters
from lora_lab.report import markdown_table

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from finetune import command_line, machine  # noqa: E402

OPENLLAMA_3B = dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
                    vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
                    tie_word_embeddings=False)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
            max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip


def build(config: dict, device: torch.device, quantize: str | None) -> torch.nn.Module:
    """The Llama architecture with random weights in bf16 on `device`, its linears (not lm_head) in NF4
    when `quantize`; frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    default = torch.get_default_dtype()
    torch.manual_seed(0)  # every variant starts from the same random base
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**config))
    finally:
        torch.set_default_dtype(default)
    if quantize:
        quantize_linears(model, quantize, skip=("lm_head",), device=device, compute_dtype=torch.bfloat16)
    model.requires_grad_(False)
    return model


def with_lora(model: torch.nn.Module, library: str, rank: int) -> torch.nn.Module:
    if library == "floor":
        model.enable_input_require_grads()  # the embeddings' output needs grad: backward runs through every layer
        return model
    if library == "peft":
        import peft

        model.enable_input_require_grads()
        return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    inject_lora(model, "all-linear", rank=rank, alpha=2 * rank)
    mark_only_lora_trainable(model)
    return model


def measure(config: dict, device: torch.device, library: str, quantize: str | None, rank: int, seq: int,
            warmup: int, steps: int, paged: bool = False) -> dict:  # fmt: skip
    model = with_lora(build(config, device, quantize), library, rank)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad] or [torch.zeros(1, requires_grad=True)]
    if paged:
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, config["vocab_size"], (1, seq), device=device, generator=None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step() -> float:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    count = count_parameters(model)
    row = {
        "library": library + (" paged AdamW" if paged else ""), "base": quantize or "bf16", "rank": rank,
        "trainable_params": count.trainable,
        "step_ms": round(1000 * seconds, 1), "tokens_per_s": round(seq / seconds, 1), "peak_gib": round(peak, 3),
        "loss": round(loss, 3),
    }  # fmt: skip
    if library == "floor":
        row.update(rank=0, trainable_params=0)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--libraries", nargs="+", default=["lora_lab", "peft"])
    parser.add_argument("--paged", action="store_true", help="also lora_lab with PagedAdamW (bitsandbytes, CUDA)")
    parser.add_argument("--tiny", action="store_true", help="a two-layer Llama on the CPU (a smoke run)")
    parser.add_argument("--out", type=Path, help="(default: experiments/results/qlora_3b_<device>)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    config = TINY if args.tiny else OPENLLAMA_3B
    seq = min(args.seq, config["max_position_embeddings"])
    start = time.perf_counter()
    rows = []
    bases = (None, "nf4") if importlib.util.find_spec("bitsandbytes") else (None,)
    if len(bases) == 1:
        print("bitsandbytes is not installed: the nf4 (QLoRA) variants are left out", flush=True)
    variants = [(0, quantize, "floor", False) for quantize in bases]  # the floor has no rank: once per base
    for rank in args.ranks:
        for quantize in bases:
            variants += [(rank, quantize, library, False) for library in args.libraries]
            variants += [(rank, quantize, "lora_lab", True)] if args.paged and device.type == "cuda" else []
    for rank, quantize, library, paged in variants:
        try:
            rows.append(measure(config, device, library, quantize, rank, seq, args.warmup, args.steps, paged))
        except torch.OutOfMemoryError as err:
            print(f"{library} {quantize or 'bf16'} r={rank}: out of memory ({err})", flush=True)
            continue
        finally:
            gc.collect()  # the variant's model and optimizer go before the next is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(rows[-1], flush=True)
    for row in rows:  # tokens/s against PEFT on the same base and rank; time against the floor on the same base
        same = [r for r in rows if r["library"] == "peft" and (r["base"], r["rank"]) == (row["base"], row["rank"])]
        floor = [r for r in rows if r["library"] == "floor" and r["base"] == row["base"]]
        row["speed_vs_peft"] = round(row["tokens_per_s"] / same[0]["tokens_per_s"], 3) if same else None
        row["vs_floor"] = round(row["step_ms"] / floor[0]["step_ms"], 3) if floor else None
    name = "tiny-cpu" if args.tiny else device.type
    out = args.out or HERE / "results" / f"qlora_3b_{name}"
    write_csv(out.with_suffix(".csv"), rows)
    command = command_line()
    title = "a two-layer Llama (smoke run, CPU)" if args.tiny else "OpenLLaMA 3B architecture, random init"
    text = (
        f"# LoRA and QLoRA memory and speed: {title}\n\n`{command}` on {machine()}; wall time "
        f"{(time.perf_counter() - start) / 60:.1f} min. Micro-batch 1 x {seq}, gradient checkpointing, AdamW, "
        "bf16 autocast; all seven linears per layer, alpha = 2r."
        + (" A smoke run: the CPU times say nothing about a GPU." if args.tiny else "")
        + "\n\n"
        + markdown_table(rows)
        + "\n"
    )
    write_text(out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
