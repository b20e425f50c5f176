"""LoRA training-step and inference cost on GPT-2 124M: lora_lab against PEFT and full fine-tuning,
measured side by side in one run, reported as ratios.

Variants (the six linears of every block, r=8, alpha=16, AdamW):
  frozen floor              no adapters, every weight frozen, gradients through the activations only
                            (what any LoRA step must at least cost: LoRA's own FLOPs come on top)
  full                      every parameter trains (the baseline LoRA is meant to beat on memory)
  lora_lab                  our LinearWithLoRA as shipped
  lora_lab, <change>        the same with one change to its forward, to price that choice
  peft                      Hugging Face PEFT's LoRA on the same model and targets
and forward-only inference: the frozen base alone, lora_lab unmerged and merged, PEFT unmerged.

Before timing, a check that the variants compute the same logits on this device.

    python experiments/bench_lora.py                       # CPU, small shapes
    python experiments/bench_lora.py --device cuda --batch 8 --seq 512 --dtype bfloat16 --steps 40

Results go to experiments/results/bench_lora_<device>_<dtype>.{csv,md}. CPU timings on two cores
move by 10% or more between runs; read them as a rough guide, the CUDA ones as the measurement.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
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
from lora_lab.params import markdown_table

RESULTS = Path(__file__).parent / "results"
PEFT_TARGETS = ["W_query", "W_key", "W_value", "out_proj", "layers.0", "layers.2"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fns: dict[str, Callable[[], None]], device: torch.device, warmup: int, steps: int, desc: str):
    """{name: (median ms, MiB the call adds over what was resident)}. Every variant is warmed up
    (and its memory read) first, then all are timed round-robin, so that clock or thermal drift
    falls on all of them alike. Memory is read on CUDA only; the CPU allocator keeps no count."""
    memory = {}
    for name, fn in fns.items():
        resident = 0
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        for _ in range(warmup):
            fn()
        _sync(device)
        cuda = device.type == "cuda"
        memory[name] = (torch.cuda.max_memory_allocated(device) - resident) / 2**20 if cuda else float("nan")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in tqdm(range(steps), desc=desc):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: (statistics.median(times[name]), memory[name]) for name in fns}


def _forward_cast_input(self, x: torch.Tensor) -> torch.Tensor:
    """LinearWithLoRA.forward as first written: the input cast to the adapter's fp32 even under
    autocast (which then casts it back to bf16), and the branch always added in place."""
    out = self.base(x)
    lora = self.lora
    h = x.to(lora.A.dtype) if x.dtype != lora.A.dtype else x
    return out.add_(F.linear(F.linear(h, lora.A) * lora.scaling, lora.B))


def _forward_add_in_place(self, x: torch.Tensor) -> torch.Tensor:
    """The branch always added in place, with autograd recording too."""
    return self.base(x).add_(self.lora(x))


def _forward_add_out_of_place(self, x: torch.Tensor) -> torch.Tensor:
    """The branch always added out of place, in inference too."""
    out = self.base(x)
    return out + self.lora(x).to(out.dtype)


def _forward_addmm(self, x: torch.Tensor) -> torch.Tensor:
    """Candidate: the scaling and the add fused into the second GEMM (out + scaling * h @ B^T),
    in place without autograd, out of place with it."""
    out = self.base(x)
    h = F.linear(x, self.lora.A)  # (..., rank); bf16 under autocast
    b, out2d, h2d = self.lora.B.t().to(h.dtype), out.view(-1, out.shape[-1]), h.view(-1, h.shape[-1])
    if not torch.is_grad_enabled():
        out2d.addmm_(h2d, b, alpha=self.lora.scaling)
        return out
    return torch.addmm(out2d, h2d, b, alpha=self.lora.scaling).view(out.shape)


def _with_forward(model: GPTModel, forward) -> GPTModel:
    model = copy.deepcopy(model)
    for _, w in lora_modules(model):
        w.forward = types.MethodType(forward, w)
    return model


def _frozen_floor(base: GPTModel) -> GPTModel:
    """The base with every weight frozen and the embeddings' output requiring grad: a training step
    then runs the forward and the backward through every activation, as LoRA must, and nothing else."""
    model = copy.deepcopy(base).requires_grad_(False)
    model.tok_emb.register_forward_hook(lambda module, inputs, out: out.requires_grad_())
    return model


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


def _checks(base, lora, peft_model, x, autocast, device, dtype_name) -> None:
    """Numbers before speed: the variants must compute the same function on this device."""
    with torch.no_grad():
        reference = _logits(lora(x[:1]))
        for name, other in (("PEFT", peft_model), ("addmm_ variant", _with_forward(lora, _forward_addmm))):
            diff = (_logits(other(x[:1])) - reference).abs().max().item()
            print(f"lora_lab vs {name} logits on {device} (fp32): max abs diff {diff:.2e}")
            assert diff <= 1e-3, f"lora_lab and {name} disagree"
    explicit = copy.deepcopy(base)
    for block in explicit.trf_blocks:
        block.att.use_sdpa = False
    with torch.no_grad(), autocast:
        fast, slow = base(x[:1]).float(), explicit(x[:1]).float()
    rel = ((fast - slow).norm() / slow.norm()).item()
    print(f"SDPA vs explicit-mask attention on {device} ({dtype_name}): relative error {rel:.2e}")


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = GPT2_CONFIGS["gpt2-124m"] if not args.tiny else dict(
        vocab_size=128, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True
    )  # fmt: skip
    with torch.device(device):
        base = GPTModel(config).eval()
    ids = torch.randint(0, base.cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    lora = _lora_model(base)
    peft_model = _peft_model(lora, base)
    _checks(base, lora, peft_model, x, autocast, device, args.dtype)

    train_models = {
        "frozen floor": _frozen_floor(base),
        "full": copy.deepcopy(base).requires_grad_(True),
        "lora_lab": lora,
        "lora_lab, input cast under autocast": _with_forward(lora, _forward_cast_input),
        "lora_lab, add always in place": _with_forward(lora, _forward_add_in_place),
        "lora_lab, add always out of place": _with_forward(lora, _forward_add_out_of_place),
        "lora_lab, addmm (fused scale + add)": _with_forward(lora, _forward_addmm),
        "peft": peft_model,
    }

    def train_step(model):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params or [torch.zeros(1, requires_grad=True)], lr=1e-4)  # the floor has none

        def step() -> None:
            with autocast:
                logits = _logits(model(x))
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def forward(model):
        @torch.no_grad()
        def call() -> None:
            with autocast:
                model.eval()(x)

        return call

    trained = _measure({n: train_step(m) for n, m in train_models.items()}, device, args.warmup, args.steps, "train")
    rows = [
        {
            "variant": n,
            "mode": "train step",
            "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
            "ms": trained[n][0],
            "step_mib": trained[n][1],
        }
        for n, m in train_models.items()
    ]
    merged = copy.deepcopy(lora)
    merge_lora(merged)
    infer_models = {
        "base (no LoRA)": base,
        "lora_lab unmerged": lora,
        "lora_lab unmerged, add out of place": train_models["lora_lab, add always out of place"],
        "lora_lab unmerged, addmm_": train_models["lora_lab, addmm (fused scale + add)"],
        "lora_lab merged": merged,
        "peft unmerged": peft_model,
    }
    timed = _measure({n: forward(m) for n, m in infer_models.items()}, device, args.warmup, args.steps, "forward")
    rows += [
        {"variant": n, "mode": "forward", "trainable": 0, "ms": timed[n][0], "step_mib": timed[n][1]}
        for n in infer_models
    ]
    # ratio: time over lora_lab's for training steps, over the frozen base's for the forward
    reference = {"train step": "lora_lab", "forward": "base (no LoRA)"}
    ref_ms = {mode: next(r["ms"] for r in rows if r["variant"] == v) for mode, v in reference.items()}
    floor = next(r["ms"] for r in rows if r["variant"] == "frozen floor")
    for r in rows:
        r["ratio"] = r["ms"] / ref_ms[r["mode"]]
        r["vs_floor"] = r["ms"] / floor if r["mode"] == "train step" else None
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
    parser.add_argument("--tiny", action="store_true", help="a two-block model: checks that it runs, times nothing")
    args = parser.parse_args()

    rows = run(args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    tag = f"{'cuda' if args.device.startswith('cuda') else 'cpu'}_{args.dtype}"
    header = (
        f"{'a two-block GPT (smoke run)' if args.tiny else 'GPT-2 124M'}, LoRA r=8 on the six block linears, "
        f"AdamW; batch {args.batch} x {args.seq} tokens, "
        f"{args.dtype}, {device}, torch {torch.__version__}; median of {args.steps} after {args.warmup} "
        "warm-up, variants timed round-robin. step_mib: memory a call adds over what is resident (CUDA only). "
        "ratio: time over lora_lab's (training) or over the base model's (forward); vs_floor: training time over "
        "the frozen floor's (no adapters, gradients through the activations only).\n\n"
    )
    write_csv(args.out / f"bench_lora_{tag}.csv", rows)
    write_text(args.out / f"bench_lora_{tag}.md", header + markdown_table(rows) + "\n")
    print(header + markdown_table(rows))


if __name__ == "__main__":
    main()
