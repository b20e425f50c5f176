"""What a LoRA training step costs, against what it must cost: lora_lab, PEFT and full fine-tuning
beside the frozen floor, on four model families, measured side by side in one process.

Cases (random weights of the real architectures; timing does not depend on the values):
  gpt2       our GPTModel 124M, r=8 on the six linears of every block          (8 x 120 tokens)
  hf-gpt2    Hugging Face GPT-2 124M (Conv1D), r=16 on c_attn, c_proj, c_fc     (8 x 120)
  minilm     all-MiniLM-L6-v2's BERT for 2-class classification, r=8 on query,
             key, value and the dense layers, the classifier trains whole        (16 x 64)
  llama      SmolLM2-135M's Llama (grouped-query attention), r=8 on all linears  (4 x 128)

Variants of one AdamW training step (forward, backward, optimizer step):
  frozen floor      no adapters, every weight frozen, gradients through the activations only: what
                    any LoRA step must at least cost (LoRA's own, small, FLOPs come on top)
  lora_lab          LinearWithLoRA as shipped (the fused node `fused.lora_linear`)
  lora_lab unfused  the same with `fused = False`: base and branch as two modules (prices the fusion)
  peft              Hugging Face PEFT's LoRA, same targets, same adapter weights
  full              every weight trains
`--dora` adds DoRA (weight-decomposed LoRA, same targets) for lora_lab and PEFT, each against its own
plain LoRA in the same round (vs_lora); and `--compile [MODE]` adds the floor and lora_lab under
torch.compile (inductor; on a GPU, MODE
"reduce-overhead" replays forward and backward as CUDA graphs, "max-autotune" also searches GEMM
kernels; the loss and AdamW stay eager). Forward-only inference
rows: the base, lora_lab unmerged and merged, PEFT unmerged.

Timing: every variant is warmed up, then all run round-robin, the order reversed every other round;
each round's time is divided by the frozen floor's (or PEFT's) of the same round, and the table
gives the median of those paired ratios with the spread of the times. `activation_mib` is what the
forward saves for backward (parameters not counted), exact on any device; `peak_mib` is CUDA's peak.

    python experiments/bench_lora.py                                   # CPU, all four cases
    python experiments/bench_lora.py --case gpt2 --device cuda --dtype bfloat16 --batch 8 --seq 512

Results: experiments/results/bench_lora_<device>_<dtype>.{csv,md}, with the machine named.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
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
from lora_lab.files import write_csv, write_text
from lora_lab.lora import lora_modules
from lora_lab.report import markdown_table

sys.path.insert(0, str(Path(__file__).parent))
from finetune import command_line  # noqa: E402

RESULTS = Path(__file__).parent / "results"


@dataclass
class Case:
    build: Callable[[], nn.Module]  # the base model, random weights, eval mode
    targets: list[str] | str
    rank: int
    batch: int
    seq: int
    head: list[str]  # modules that train whole beside LoRA
    classify: bool = False


def _gpt2() -> nn.Module:
    return GPTModel(GPT2_CONFIGS["gpt2-124m"])


def _hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config())  # 124M


def _minilm() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        num_labels=2,
    )  # fmt: skip  # all-MiniLM-L6-v2
    return BertForSequenceClassification(config)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip  # SmolLM2-135M
    return LlamaForCausalLM(config)


def _tiny_gpt() -> nn.Module:
    config = dict(vocab_size=128, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)
    return GPTModel(config)


CASES = {
    "gpt2": Case(_gpt2, lora_targets("attn+ffn"), 8, 8, 120, []),
    "hf-gpt2": Case(_hf_gpt2, ["c_attn", "c_proj", "c_fc"], 16, 8, 120, []),
    "minilm": Case(_minilm, ["query", "key", "value", "dense"], 8, 16, 64, ["classifier"], classify=True),
    "llama": Case(_llama, "all-linear", 8, 4, 128, []),
}
VARIANTS = ["frozen floor", "lora_lab", "lora_lab unfused", "peft", "full", "lora_lab dora", "peft dora"]
TINY = Case(_tiny_gpt, lora_targets("attn+ffn"), 4, 2, 16, [])


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _lora(base: nn.Module, case: Case, use_dora: bool = False) -> nn.Module:
    model = copy.deepcopy(base)
    inject_lora(model, case.targets, rank=case.rank, alpha=2 * case.rank, use_dora=use_dora)
    mark_only_lora_trainable(model, train=case.head)
    with torch.no_grad():  # a trained-looking adapter, so merged and unmerged differ from the base
        for _, w in lora_modules(model):
            w.lora.B.normal_(std=0.01)
    return model


def _unfused(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for _, w in lora_modules(model):
        w.fused = False
    return model


def _peft(lora: nn.Module, base: nn.Module, case: Case) -> nn.Module:
    import peft

    with tempfile.TemporaryDirectory() as tmp:
        export_peft_adapter(lora, tmp, extra=case.head)
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp, is_trainable=True)


def _frozen_floor(base: nn.Module) -> nn.Module:
    """The base with every weight frozen and the input embeddings' output requiring grad: a step then
    runs the forward and the backward through every activation, as LoRA must, and nothing else."""
    model = copy.deepcopy(base).requires_grad_(False)
    embedding = model.tok_emb if isinstance(model, GPTModel) else model.get_input_embeddings()
    embedding.register_forward_hook(lambda module, inputs, out: out.requires_grad_())
    return model


def _saved_mib(model: nn.Module, run: Callable[[], torch.Tensor]) -> float:
    """MiB of the tensors the forward saves for backward, each storage once, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2**20


def _measure(fns: dict[str, Callable[[], None]], device: torch.device, warmup: int, rounds: int, desc: str):
    """{name: [ms per round]}: every variant warmed up, then all timed round-robin, the order reversed
    every other round so that none always runs right after the same neighbour."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in tqdm(range(rounds), desc=desc):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(1000 * (time.perf_counter() - start))
    return times


def _paired(times: dict[str, list[float]], name: str, reference: str) -> float | None:
    if reference not in times:
        return None
    return statistics.median(a / b for a, b in zip(times[name], times[reference], strict=True))


def _spread(ms: list[float]) -> float:
    """Half the interquartile range as a percent of the median: the timing noise of one variant."""
    q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0], ms[0], ms[0])
    return 50 * (q3 - q1) / statistics.median(ms)


def run_case(name: str, case: Case, args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    batch, seq = args.batch or case.batch, args.seq or case.seq
    torch.manual_seed(0)
    with torch.device(device):
        base = case.build().eval()
    vocab = base.cfg.vocab_size if isinstance(base, GPTModel) else base.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq + 1), device=device)
    x = ids[:, :-1]
    y = torch.randint(0, 2, (batch,), device=device) if case.classify else ids[:, 1:]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    lora = _lora(base, case)
    peft_model = _peft(lora, base, case)
    dora = _lora(base, case, use_dora=True) if args.dora else None
    peft_dora = _peft(dora, base, case) if args.dora else None
    with torch.no_grad():  # numbers before speed: the variants compute the same function here
        pairs = [(lora, "peft", peft_model), (lora, "unfused", _unfused(lora))] + (
            [(dora, "peft dora", peft_dora)] if dora else []
        )
        for ours, other_name, other in pairs:
            diff = (_logits(other(x[:1])) - _logits(ours(x[:1]))).abs().max().item()
            print(f"{name}: lora_lab vs {other_name} logits on {device} (fp32): max abs diff {diff:.2e}")
            assert diff <= 1e-3, f"lora_lab and {other_name} disagree"

    train_models = {
        "frozen floor": _frozen_floor(base),
        "lora_lab": lora,
        "lora_lab unfused": _unfused(lora),
        "peft": peft_model,
        "full": copy.deepcopy(base).requires_grad_(True),
    }
    if args.dora:
        train_models.update({"lora_lab dora": dora, "peft dora": peft_dora})
    if args.only:  # a pair timed alone (e.g. the floor and lora_lab): no neighbour's memory traffic in between
        train_models = {n: m for n, m in train_models.items() if n in args.only}
    if args.compile:
        mode = None if args.compile == "default" else args.compile
        suffix = "compiled" if mode is None else f"compiled {mode}"
        for eager in [n for n in ("frozen floor", "lora_lab") if n in train_models]:
            train_models[f"{eager}, {suffix}"] = torch.compile(train_models[eager], mode=mode)
    cuda_graphs = args.compile in ("reduce-overhead", "max-autotune")

    def loss_of(model) -> torch.Tensor:
        with autocast:
            logits = _logits(model(x)).float()
        return F.cross_entropy(logits.flatten(0, -2), y.flatten())

    def train_step(model):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params or [torch.zeros(1, requires_grad=True)], lr=1e-4)  # the floor has none

        def step() -> None:
            if cuda_graphs:  # a new step: the CUDA graphs may reuse the last step's outputs
                torch.compiler.cudagraph_mark_step_begin()
            loss_of(model).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    steps = {n: train_step(m) for n, m in train_models.items()}
    peaks = {}
    for n, fn in steps.items():  # warm up alone (compiling, if so), then a step's CUDA peak over what stays
        fn()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        peaks[n] = (torch.cuda.max_memory_allocated(device) - resident) / 2**20 if device.type == "cuda" else None
    saved = {n: _saved_mib(m, lambda m=m: loss_of(m)) for n, m in train_models.items() if "compiled" not in n}
    times = _measure(steps, device, max(args.warmup - 2, 0), args.steps, f"{name} train")

    def floor_of(variant: str) -> str:  # a compiled variant against the floor compiled the same way
        return "frozen floor," + variant.partition(",")[2] if "compiled" in variant else "frozen floor"

    rows = []
    for n, m in train_models.items():
        rows.append(
            {
                "case": name,
                "mode": "train step",
                "variant": n,
                "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
                "ms": statistics.median(times[n]),
                "spread_pct": _spread(times[n]),
                "vs_floor": _paired(times, n, floor_of(n)),
                "vs_peft": _paired(times, n, "peft dora" if "dora" in n else "peft"),
                **(
                    {"vs_lora": _paired(times, n, n.replace(" dora", "")) if "dora" in n else None} if args.dora else {}
                ),
                "activation_mib": saved.get(n),
                "peak_mib": peaks[n],
            }
        )

    if args.only:
        return rows
    merged = copy.deepcopy(lora)
    merge_lora(merged)
    infer_models = {"base": base, "lora_lab unmerged": lora, "lora_lab merged": merged, "peft unmerged": peft_model}

    def forward(model):
        @torch.no_grad()
        def call() -> None:
            with autocast:
                model.eval()(x)

        return call

    times = _measure({n: forward(m) for n, m in infer_models.items()}, device, args.warmup, args.steps, f"{name} fwd")
    for n in infer_models:
        rows.append(
            {
                "case": name,
                "mode": "forward",
                "variant": n,
                "trainable": 0,
                "ms": statistics.median(times[n]),
                "spread_pct": _spread(times[n]),
                "vs_floor": _paired(times, n, "base"),
                "vs_peft": _paired(times, n, "peft unmerged"),
                "activation_mib": None,
                "peak_mib": None,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=list(CASES), help="repeat for several (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, help="rows per batch (default: the case's)")
    parser.add_argument("--seq", type=int, help="tokens per row (default: the case's)")
    parser.add_argument("--warmup", type=int, default=2, help="calls before timing (at least 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--only", action="append", choices=VARIANTS, help="time only these training variants "
                        "(repeat; no forward rows)")  # fmt: skip
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=["default", "reduce-overhead", "max-autotune"],
        help="add the floor and lora_lab under torch.compile, in this mode (default: default)",
    )
    parser.add_argument("--dora", action="store_true", help="add DoRA training steps for lora_lab and PEFT")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tiny", action="store_true", help="a two-block GPT: checks that it runs, times nothing")
    args = parser.parse_args()
    args.warmup = max(args.warmup, 2)  # a training variant's peak memory is read on its second call
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    cases = {"tiny": TINY} if args.tiny else {n: CASES[n] for n in args.case or CASES}
    rows = [row for name, case in cases.items() for row in run_case(name, case, args)]
    columns = dict.fromkeys(k for row in rows for k in row)  # forward rows have no vs_lora
    rows = [{k: row.get(k) for k in columns} for row in rows]
    minutes = (time.perf_counter() - started) / 60
    cuda = args.device.startswith("cuda")
    machine = torch.cuda.get_device_name() if cuda else f"{platform.machine()}, {torch.get_num_threads()} CPU threads"
    tag = f"{'cuda' if cuda else 'cpu'}_{args.dtype}"
    if args.only:
        tag += "_" + "-".join(n.replace(" ", "_") for n in args.only)
    if args.dora:
        tag += "_dora"
    if args.compile:
        tag += "_compiled" + ("" if args.compile == "default" else f"-{args.compile}")
    if args.tiny:  # a smoke run never replaces real figures
        tag += "_tiny"
    command = command_line()
    header = (
        f"`{command}`\n\n{'smoke run, ' if args.tiny else ''}{args.dtype}, {machine}, torch {torch.__version__}; "
        f"{args.steps} rounds after {args.warmup} warm-up, variants round-robin; {minutes:.1f} min.\n"
        "ms: median time; spread_pct: half the interquartile range over the median; vs_floor / vs_peft: median "
        "over rounds of the time over the frozen floor's (compiled alike, for a compiled variant; the base "
        "model's, for forward) / PEFT's in the same round; activation_mib: saved for backward; peak_mib: CUDA "
        "peak of one step over what stayed allocated (every variant's weights and optimizer state).\n\n"
    )
    write_csv(args.out / f"bench_lora_{tag}.csv", rows)
    write_text(args.out / f"bench_lora_{tag}.md", header + markdown_table(rows) + "\n")
    print(header + markdown_table(rows))


if __name__ == "__main__":
    main()
