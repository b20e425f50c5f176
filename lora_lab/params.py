"""Exact parameter counts and memory figures for any model, LoRA-wrapped or not.

Everything here reads only shapes and dtypes, so it works on models built on the meta device
(nothing allocated), which is how multi-billion-parameter models are counted on a laptop.
Pure functions: they return numbers and rows; printing is left to the caller.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .inject import inject_lora, mark_only_lora_trainable
from .lora import LoRALayer
from .targets import Targets, classifier_head_name, output_head_name

GROUPS = ("embedding", "attention", "feed-forward", "norm", "head", "LoRA", "other")
# A linear belongs to the attention or feed-forward block it lives in: found by the classes of
# the modules around it first (GPT2Attention, T5LayerFF, LlamaMLP...), by their names second.
_ATTENTION_CLASS = re.compile(r"Attention|Attn", re.IGNORECASE)
_FEED_FORWARD_CLASS = re.compile(r"MLP|FeedForward|FFN|LayerFF|DenseActDense|DenseGatedActDense|Intermediate", re.I)
_ATTENTION = re.compile(
    r"(^|\.)(att|attn|attention|self_attn|self_attention|selfattention|encdecattention|encoder_attn|crossattention"
    r"|q_proj|k_proj|v_proj|o_proj|w_query|w_key|w_value|query|key|value)(\.|$)",
    re.IGNORECASE,
)
_FEED_FORWARD = re.compile(
    r"(^|\.)(ff|ffn|ffn_output|mlp|feed_forward|intermediate|output|fc1|fc2|c_fc|gate_proj|up_proj|down_proj"
    r"|densereludense"
    r"|wi|wo)(\.|$)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a model; tied (shared) tensors are counted once."""

    total: int
    trainable: int

    @property
    def fraction(self) -> float:
        """trainable / total, between 0 and 1."""
        return self.trainable / self.total if self.total else 0.0


@dataclass(frozen=True)
class ReportRow:
    """One group of parameters: how many, how many train, and the bytes they take as stored."""

    group: str
    parameters: int
    trainable: int
    bytes: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training step keeps besides activations: weights as stored, one gradient per
    trainable parameter, and the optimizer's state (AdamW: two moments per trainable parameter,
    in the parameter's dtype as torch.optim.AdamW keeps them)."""

    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def parameter_numel(param: nn.Parameter, module: nn.Module | None = None) -> int:
    """Number of parameters a tensor stands for; a bitsandbytes 4-bit weight packs two per byte,
    so its storage holds fewer elements than the layer has weights. Sharded by FSDP, such a weight
    is a DTensor of its codes, and its layer (`module`) keeps the quantization state."""
    quant_state = getattr(param, "quant_state", None) if type(param).__name__ == "Params4bit" else None
    if quant_state is None and module is not None and getattr(module, "weight", None) is param:
        quant_state = getattr(module, "quant_state", None)  # a bitsandbytes Linear4bit's, else None
    if quant_state is not None and hasattr(quant_state, "shape"):
        return int(quant_state.shape.numel())
    return param.numel()


def _named_unique_parameters(model: nn.Module):
    """(owning module name, owning module, parameter), each tensor once (first owner wins)."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield module_name, module, param


def count_parameters(model: nn.Module) -> ParameterCount:
    """Total and trainable parameters of `model`, tied tensors counted once."""
    total = trainable = 0
    for _, module, param in _named_unique_parameters(model):
        n = parameter_numel(param, module)
        total += n
        trainable += n if param.requires_grad else 0
    return ParameterCount(total, trainable)


def head_block_name(model: nn.Module) -> str | None:
    """The module holding the model's output head: the head itself, or the top-level module
    around it when that holds no embedding (BERT's `cls` around `cls.predictions.decoder`)."""
    head = output_head_name(model)
    if head is None or "." not in head:
        return head
    top = head.split(".")[0]
    holds_embedding = any(isinstance(m, nn.Embedding) for m in model.get_submodule(top).modules())
    return head if holds_embedding else top


def _group(module_name: str, module: nn.Module, modules: dict[str, nn.Module], head: str | None) -> str:
    if isinstance(module, LoRALayer):
        return "LoRA"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if "Norm" in type(module).__name__:
        return "norm"
    if head is not None and (module_name == head or module_name.startswith(head + ".")):
        return "head"
    parts = module_name.split(".")
    around = [modules[".".join(parts[:i])] for i in range(len(parts), 0, -1)] if module_name else []
    if any("Embedding" in type(m).__name__ for m in around):  # ViT's patch projection, BERT's embeddings
        return "embedding"
    if any(_ATTENTION_CLASS.search(type(m).__name__) for m in around) or _ATTENTION.search(module_name):
        return "attention"
    if any(_FEED_FORWARD_CLASS.search(type(m).__name__) for m in around) or _FEED_FORWARD.search(module_name):
        return "feed-forward"
    return "other"


def parameter_report(model: nn.Module) -> list[ReportRow]:
    """Parameters grouped by module kind (embedding, attention, feed-forward, norm, head, LoRA,
    other), in that order, leaving out empty groups. A parameter goes by its module's type
    (embedding, norm, LoRA), then by the block it lives in: the output head's, an attention or a
    feed-forward block (found by the classes of the modules around it, then by their names).
    "other" keeps what is none of these, such as BERT's pooler."""
    head = head_block_name(model)
    modules = dict(model.named_modules())
    sums = {g: [0, 0, 0] for g in GROUPS}
    for module_name, module, param in _named_unique_parameters(model):
        n = parameter_numel(param, module)
        row = sums[_group(module_name, module, modules, head)]
        row[0] += n
        row[1] += n if param.requires_grad else 0
        row[2] += stored_bytes(module, param)
    return [ReportRow(g, *sums[g]) for g in GROUPS if sums[g][0]]


def _tensor_bytes(*tensors: object) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def stored_bytes(module: nn.Module, param: nn.Parameter) -> int:
    """Bytes `param` takes as stored, with what a quantized weight needs to be read back:
    bitsandbytes 4-bit blocks' absmax and code book (and their own quantization state under
    double quantization), 8-bit rows' scales."""
    size = _tensor_bytes(param)
    state = getattr(param, "quant_state", None)
    if type(param).__name__ == "Params4bit" and state is not None:
        size += _tensor_bytes(state.absmax, state.code)
        if getattr(state, "nested", False) and state.state2 is not None:
            size += _tensor_bytes(state.offset, state.state2.absmax, state.state2.code)
    elif type(param).__name__ == "Int8Params":
        scales = getattr(param, "SCB", None)
        size += _tensor_bytes(scales if scales is not None else getattr(getattr(module, "state", None), "SCB", None))
    return size


def memory_estimate(model: nn.Module, optimizer_states: int = 2) -> MemoryEstimate:
    """Weights, gradients and optimizer state in bytes (`optimizer_states` tensors per trainable
    parameter: 2 for Adam/AdamW, 1 for SGD with momentum, 0 for plain SGD). Quantized weights
    count with their quantization state (`stored_bytes`)."""
    weights = grads = 0
    for _, module, param in _named_unique_parameters(model):
        weights += stored_bytes(module, param)
        grads += _tensor_bytes(param) if param.requires_grad else 0
    return MemoryEstimate(weights, grads, grads * optimizer_states)


def format_trainable(count: ParameterCount) -> str:
    """PEFT's familiar line: ``trainable params: 1,327,104 || all params: ... || trainable%: ...``."""
    return (
        f"trainable params: {count.trainable:,d} || all params: {count.total:,d} || "
        f"trainable%: {100 * count.fraction:.4f}"
    )


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of a weight of `numel` values in bitsandbytes' 4-bit NF4, as QLoRA stores it: two values
    per byte, one absmax per block of `blocksize` (fp32; with double quantization 8-bit, plus an
    fp32 absmax per 256 blocks, their 256-entry code book and offset) and the 16-entry NF4 code."""
    blocks = -(-numel // blocksize)
    size = -(-numel // 2) + 16 * 4
    if not double_quant:
        return size + 4 * blocks
    return size + blocks + 4 * -(-blocks // 256) + 256 * 4 + 4


# How a training step keeps each kind of parameter, in bytes per parameter (weight, gradient, and
# AdamW's two moments): LoRA (and a trained head) in fp32 over a frozen base in fp32, bf16 or
# NF4 (QLoRA: linears in NF4, the rest in bf16), against full fine-tuning in fp32 or in bf16.
MEMORY_SETTINGS = ("lora_fp32", "lora_bf16", "qlora_nf4", "full_fp32", "full_bf16")


SHARDINGS = ("ddp", "fsdp")  # a whole copy on every GPU, or each tensor cut in rows over the GPUs (FSDP2)


def _nf4_shard_bytes(numel: int, gpus: int) -> int:
    """One GPU's bytes of an NF4 weight under FSDP2: its 4-bit codes (a uint8 tensor of ceil(numel / 2)
    rows) cut in `gpus` row shards, its quantization state (absmax, code books: not parameters) whole.
    One GPU holds `nf4_bytes`."""
    codes = -(-numel // 2)
    return nf4_bytes(numel) - codes + -(-codes // gpus)


def _shard_numel(param: nn.Parameter, gpus: int, sharding: str) -> int:
    """The values of `param` one GPU holds: all of them under DDP; under FSDP2 its rows cut in `gpus`
    equal shards (the last padded), ceil(rows / gpus) rows each."""
    n = parameter_numel(param)
    if sharding == "ddp" or gpus == 1 or param.dim() == 0:
        return n
    rows = param.shape[0]
    return -(-rows // gpus) * (n // rows)


def training_memory(
    model: nn.Module, setting: str, quantizable: set[int] = frozenset(), gpus: int = 1, sharding: str = "ddp"
) -> int:
    """Bytes of weights, gradients and AdamW state for training `model` (LoRA injected, trainable
    flags set) in `setting` (one of MEMORY_SETTINGS), on one of `gpus` GPUs under `sharding` (DDP:
    each GPU holds it all; FSDP: each holds a shard of every tensor). `quantizable`: the ids of the
    frozen weights QLoRA stores in NF4 (the linears'); "full_*" settings train every parameter but LoRA's."""
    if setting not in MEMORY_SETTINGS:
        raise ValueError(f"unknown memory setting {setting!r}: use one of {MEMORY_SETTINGS}")
    if sharding not in SHARDINGS:
        raise ValueError(f"unknown sharding {sharding!r}: use one of {SHARDINGS}")
    total = 0
    for _, module, param in _named_unique_parameters(model):
        n = _shard_numel(param, gpus, sharding)
        if setting.startswith("full"):
            total += 0 if isinstance(module, LoRALayer) else n * (16 if setting == "full_fp32" else 8)
        elif param.requires_grad:
            total += 16 * n  # fp32 weight, gradient and two AdamW moments
        elif setting == "qlora_nf4" and id(param) in quantizable:
            total += _nf4_shard_bytes(parameter_numel(param), gpus if sharding == "fsdp" else 1)
        else:
            total += n * (4 if setting == "lora_fp32" else 2)
    return total


FSDP_SETTINGS = ("lora_fp32", "lora_bf16", "qlora_nf4")  # a --fsdp run's base: fp32, bf16 (--bf16), NF4


def fsdp_gathered_bytes(model: nn.Module, setting: str = "lora_fp32", quantizable: set[int] = frozenset()) -> int:
    """Under FSDP, what one GPU holds whole for a while besides its shards: the root's own weights
    (embeddings, the output head, the final norm: gathered for the whole forward and backward) and two
    transformer blocks (the one computing and the next, fetched ahead), in the setting's storage (an
    NF4 weight's 4-bit codes; its quantization state is whole on every GPU already)."""
    from .distributed import transformer_blocks

    blocks = transformer_blocks(model)
    inside = {id(p) for block in blocks for p in block.parameters()}
    root = sum(_weight_bytes(p, setting, quantizable) for _, _, p in _named_unique_parameters(model)
               if id(p) not in inside)  # fmt: skip
    sizes = [sum(_weight_bytes(p, setting, quantizable) for _, _, p in _named_unique_parameters(b)) for b in blocks]
    return root + 2 * max(sizes, default=0)


def _weight_bytes(param: nn.Parameter, setting: str, quantizable: set[int]) -> int:
    """A weight's bytes as FSDP gathers it in `setting`: 4 a value in fp32; NF4 weights their 4-bit
    codes; the rest 2 in bf16 (trainable fp32 tensors are cast to bf16 before they are gathered)."""
    n = parameter_numel(param)
    if setting in ("full_fp32", "lora_fp32"):
        return 4 * n
    return -(-n // 2) if setting == "qlora_nf4" and id(param) in quantizable else 2 * n


# Decimals that rank_report rounds its floats to: the trainable percentage to 6, MiB to 1.
REPORT_DECIMALS = {
    "trainable_percent": 6,
    **{f"{s}_mib": 1 for s in MEMORY_SETTINGS},
    **{f"{s}_per_gpu_mib": 1 for s in MEMORY_SETTINGS},
    **{f"{s}_gathered_mib": 1 for s in FSDP_SETTINGS},
}


def rank_report(
    build: Callable[[], nn.Module],
    ranks: Iterable[int],
    targets: Targets = "all-linear",
    model_name: str = "",
    use_dora: bool = False,
    gpus: int = 1,
    sharding: str = "ddp",
) -> list[dict[str, float | int | str]]:
    """For each rank (each once, in the order given): LoRA on `targets` of a model fresh from
    `build()`, everything else frozen but a classification head (`classifier`, `score`, ...), which
    trains whole as PEFT's modules_to_save do: what that leaves to train, and the training memory
    (weights, gradients, AdamW; no activations) over an fp32, bf16 or NF4 base next to full
    fine-tuning. Counts are exact; percentages and MiB are rounded as `REPORT_DECIMALS` says. Build on
    the meta device to count models of any size. `use_dora`: DoRA's magnitude vectors counted too.
    With `gpus` > 1: each setting's memory on one GPU under `sharding` ("ddp" or "fsdp"), and under
    FSDP what is gathered whole for a while on top (`*_gathered_mib`: the root and two blocks) in the
    settings a --fsdp run takes: the fp32 base it loads, bf16 (`--bf16`), QLoRA (`--quantize nf4 --bf16`)."""
    from .targets import find_targets

    rows = []
    label = targets if isinstance(targets, str) else "+".join(targets) if not callable(targets) else "callable"
    label += ", DoRA" if use_dora else ""
    for rank in dict.fromkeys(ranks):
        model = build()
        head = classifier_head_name(model)
        linears = find_targets(model, "all-linear")  # what QLoRA quantizes: every linear but the head
        # (an nn.MultiheadAttention that "all-linear" takes whole has no one weight to quantize)
        quantizable = {id(w) for n in linears if (w := getattr(model.get_submodule(n), "weight", None)) is not None}
        names = inject_lora(model, targets, rank=rank, alpha=2 * rank, use_dora=use_dora)
        mark_only_lora_trainable(model, train=[head] if head else [])
        count = count_parameters(model)
        row: dict[str, float | int | str] = {"model": model_name, "targets": label} if model_name else {}
        row.update(
            rank=rank,
            lora_modules=len(names),
            total_params=count.total,
            trainable_params=count.trainable,
            trainable_percent=100 * count.fraction,  # as PEFT prints it
        )
        for setting in MEMORY_SETTINGS:
            row[f"{setting}_mib"] = training_memory(model, setting, quantizable) / 2**20
        if gpus > 1:  # one GPU's share, beside the one-device columns
            row.update(gpus=gpus, sharding=sharding)
            for setting in MEMORY_SETTINGS:
                row[f"{setting}_per_gpu_mib"] = training_memory(model, setting, quantizable, gpus, sharding) / 2**20
            if sharding == "fsdp":  # what a --fsdp run holds whole for a while: the root and two blocks
                for setting in FSDP_SETTINGS:
                    row[f"{setting}_gathered_mib"] = fsdp_gathered_bytes(model, setting, quantizable) / 2**20
        rows.append({k: round(v, REPORT_DECIMALS[k]) if k in REPORT_DECIMALS else v for k, v in row.items()})
    return rows


# ---- measured, not estimated: the peak memory of this process ----------------------------------


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the peak afresh (each point of a sweep in one process has its own): the
    accelerator's peak allocation, or on Linux the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current resident set
    except OSError:
        pass  # elsewhere the figure is the process's peak so far


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory since `reset_peak_memory`: the accelerator's allocations, or the process's
    resident set on CPU (on Linux; elsewhere since the process started)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 2**10  # KiB
    except (OSError, IndexError, ValueError):
        return _peak_without_proc()


def _peak_without_proc() -> float:
    """The process's peak resident set where /proc is not: `resource` on POSIX, psutil's peak working
    set on Windows (NaN, unknown, without psutil)."""
    try:
        import resource  # POSIX only: imported where it is used, so the package imports everywhere
    except ImportError:
        try:
            import psutil
        except ImportError:
            return float("nan")
        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
