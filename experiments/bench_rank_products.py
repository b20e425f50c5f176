"""Where a LoRA step's time goes beyond the frozen model: the rank-r products, one at a time.

For each linear that LoRA wraps in one transformer block of each `bench_lora.py` case (same shapes,
tokens per batch and rank), this times the frozen base's two GEMMs (the forward x W^T and the input
gradient g W, as an nn.Linear runs them: no bias, and for HF GPT-2's Conv1D the transposed layout)
and the six rank-r products the fused LoRA linear adds (`lora_lab/fused.py`, in its orientation):

  h = x A^T               forward, reads x
  y += s h B^T            forward, reads and writes y
  (s g B)^T = s B^T g^T   backward, reads g
  dA = (s g B)^T x        backward, reads x
  dB = s (h^T g)^T        backward, reads g
  dx += (s g B) A         backward, reads and writes dx

Each is timed from a cold cache (64 MiB written in between), and beside it the time to read its
large operand once (a sum; for the two in-place products, which also write it, a lower bound). The
summary sets the products' time against the base GEMMs' and against two references: the products at
the base GEMMs' FLOP rate (their share of the arithmetic) and at the streaming rate. Inside a step
some operands are still in cache from the op before (y after the base GEMM wrote it, g read twice in
a row), and the first block's linears skip dx; so the sum is an estimate, on the high side, of what
LoRA adds to a step however the code around the products is written.

    python experiments/bench_rank_products.py                  # the four bench_lora cases
    python experiments/bench_rank_products.py --block gpt2 --rank 16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lora_lab.files import write_csv, write_text
from lora_lab.report import markdown_table

sys.path.insert(0, str(Path(__file__).parent))
from finetune import command_line  # noqa: E402

RESULTS = Path(__file__).parent / "results"


@dataclass
class Block:
    tokens: int  # rows of x: batch x sequence of the bench_lora case
    rank: int
    linears: list[tuple[str, int, int]]  # (name, in_features, out_features) of the wrapped linears


BLOCKS = {
    "gpt2": Block(8 * 120, 8, [("W_query", 768, 768), ("W_key", 768, 768), ("W_value", 768, 768),
                               ("out_proj", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768)]),
    "hf-gpt2": Block(8 * 120, 16, [("c_attn", 768, 2304), ("attn.c_proj", 768, 768), ("c_fc", 768, 3072),
                                   ("mlp.c_proj", 3072, 768)]),
    "minilm": Block(16 * 64, 8, [("query", 384, 384), ("key", 384, 384), ("value", 384, 384),
                                 ("attention.output.dense", 384, 384), ("intermediate.dense", 384, 1536),
                                 ("output.dense", 1536, 384)]),
    "llama": Block(4 * 128, 8, [("q_proj", 576, 576), ("k_proj", 576, 192), ("v_proj", 576, 192),
                                ("o_proj", 576, 576), ("gate_proj", 576, 1536), ("up_proj", 576, 1536),
                                ("down_proj", 1536, 576)]),
}  # fmt: skip
TINY = Block(16, 2, [("fc", 32, 64)])


def _timer(repeats: int, flush: torch.Tensor):
    def median_ms(fn) -> float:
        times = []
        for _ in range(repeats + 2):
            flush.fill_(1)  # evict the operands: inside a step they come from memory, not from cache
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times[2:])

    return median_ms


def products(n: int, d_in: int, d_out: int, rank: int, median_ms) -> list[dict]:
    """One row per GEMM of a wrapped linear: the base's two, then LoRA's six."""
    torch.manual_seed(0)
    x, g = torch.randn(n, d_in), torch.randn(n, d_out)
    W, A, B = torch.randn(d_out, d_in), torch.randn(rank, d_in), torch.randn(d_out, rank)
    y, dx, h, gh_t = torch.randn(n, d_out), torch.randn(n, d_in), torch.randn(n, rank), torch.randn(rank, n)
    s = 2.0
    # (name, base or lora, fn, flops, the large operand it streams)
    cases = [
        ("x W^T", "base", lambda: x.mm(W.t()), 2 * n * d_in * d_out, x),
        ("g W", "base", lambda: g.mm(W), 2 * n * d_in * d_out, g),
        ("h = x A^T", "lora", lambda: x.mm(A.t()), 2 * n * d_in * rank, x),
        ("y += s h B^T", "lora", lambda: y.addmm_(h, B.t(), alpha=s), 2 * n * d_out * rank, y),
        ("(s g B)^T", "lora", lambda: B.t().mm(g.t()).mul_(s), 2 * n * d_out * rank, g),
        ("dA", "lora", lambda: gh_t.mm(x), 2 * n * d_in * rank, x),
        ("dB", "lora", lambda: h.t().mm(g).mul_(s).t(), 2 * n * d_out * rank, g),
        ("dx += (s g B) A", "lora", lambda: dx.addmm_(gh_t.t(), A), 2 * n * d_in * rank, dx),
    ]
    rows = []
    for name, kind, fn, flops, operand in cases:
        ms = median_ms(fn)
        read_ms = median_ms(operand.sum)
        mb = operand.numel() * operand.element_size() / 1e6
        rows.append({"product": name, "kind": kind, "ms": ms, "gflop_s": flops / ms / 1e6, "flops": flops,
                     "operand_mb": mb, "gb_s": mb / ms, "read_ms": read_ms})  # fmt: skip
    return rows


def summarize(name: str, block: Block, rows: list[dict]) -> dict:
    base = [r for r in rows if r["kind"] == "base"]
    lora = [r for r in rows if r["kind"] == "lora"]
    base_ms, lora_ms = sum(r["ms"] for r in base), sum(r["ms"] for r in lora)
    return {
        "case": name,
        "tokens": block.tokens,
        "rank": block.rank,
        "base_gemms_ms": base_ms,
        "rank_r_ms": lora_ms,
        "rank_r_pct": 100 * lora_ms / base_ms,  # what LoRA adds to the block's linears
        "at_base_rate_pct": 100 * sum(r["flops"] for r in lora) / sum(r["flops"] for r in base),
        "at_read_rate_pct": 100 * sum(r["read_ms"] for r in lora) / base_ms,
        "base_gflop_s": sum(r["flops"] for r in base) / base_ms / 1e6,
        "rank_r_gflop_s": sum(r["flops"] for r in lora) / lora_ms / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", action="append", choices=list(BLOCKS), help="repeat for several (default: all)")
    parser.add_argument("--rank", type=int, help="LoRA rank (default: the case's)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tiny", action="store_true", help="one small linear, 2 repeats: checks that it runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    blocks = {"tiny": TINY} if args.tiny else {n: BLOCKS[n] for n in args.block or BLOCKS}
    repeats = 2 if args.tiny else args.repeats

    started = time.perf_counter()
    median_ms = _timer(repeats, torch.empty(64 << 20, dtype=torch.uint8))
    rows, summary = [], []
    for name, block in blocks.items():
        if args.rank:
            block = replace(block, rank=args.rank)
        block_rows = [
            {"case": name, "layer": layer, "shape": f"{block.tokens}x{d_in}->{d_out}", "rank": block.rank, **row}
            for layer, d_in, d_out in block.linears
            for row in products(block.tokens, d_in, d_out, block.rank, median_ms)
        ]
        rows += block_rows
        summary.append(summarize(name, block, block_rows))

    machine = f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    command = command_line()
    header = (
        f"`{command}`\n\n{'smoke run, ' if args.tiny else ''}float32, {machine}; median of {repeats} calls, "
        f"each from a cold cache; {(time.perf_counter() - started) / 60:.1f} min.\n\n"
        "Per block: base_gemms_ms, the frozen base's forward and input-gradient GEMMs of the wrapped linears; "
        "rank_r_ms, LoRA's six rank-r products of each; rank_r_pct, those over the base GEMMs; "
        "at_base_rate_pct, what they would add at the base GEMMs' FLOP rate (their share of the arithmetic); "
        "at_read_rate_pct, reading each one's large operand once, at streaming speed.\n\n"
    )
    detail = (
        "\nPer product: gflop_s, its FLOP rate; operand_mb, its large operand (x, g, y or dx); gb_s, that "
        "operand's size over the time; read_ms, the time to read that operand once (a sum).\n\n"
    )
    table = [{k: v for k, v in r.items() if k != "flops"} for r in rows]
    stem = "bench_rank_products"  # the default run's name; any other run says how it differs
    if args.tiny:
        stem += "_tiny"
    if args.block:
        stem += "_" + "-".join(blocks)
    if args.rank:
        stem += f"_r{args.rank}"
    write_csv(args.out / f"{stem}.csv", table)
    text = header + markdown_table(summary) + "\n" + detail + markdown_table(table) + "\n"
    write_text(args.out / f"{stem}.md", text)
    print(header + markdown_table(summary))


if __name__ == "__main__":
    main()
