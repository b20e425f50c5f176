"""QLoRA's frozen base: a model's linears stored in 4-bit NF4 or 8-bit through bitsandbytes (which
runs on CPUs too), everything else in the compute dtype. Hugging Face checkpoints go through
transformers' BitsAndBytesConfig (`bnb_config`); our GPTModel and GGUF files through
`quantize_linears`, which swaps the linears for bitsandbytes layers in place."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

QUANTIZE = ("nf4", "int8")
QUANTIZED_WEIGHTS = {"Params4bit": "4-bit", "Int8Params": "8-bit"}  # bitsandbytes weight classes


def _bitsandbytes():
    # bitsandbytes warns on import that the optional `kernels` package (a faster CPU 4-bit matmul) is
    # missing: harmless, and not the user's to act on, so that one logger is quiet while it imports.
    notice = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "--quantize needs bitsandbytes: pip install bitsandbytes (or pip install -e '.[quant]')"
        ) from err
    finally:
        notice.setLevel(level)
    return bitsandbytes


def quantize_linears(
    model: nn.Module,
    quantize: str,
    skip: tuple[str, ...] = (),
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Replace every `nn.Linear` of `model` (but those named in `skip` and what they hold) with a
    frozen bitsandbytes layer holding the same weights: 4-bit NF4 with double quantization (QLoRA),
    or 8-bit (LLM.int8()); quantized as they move to `device`. Returns the names replaced."""
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantization {quantize!r}: use {' or '.join(QUANTIZE)}")
    bnb = _bitsandbytes()
    names = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if quantize == "nf4":
            new = bnb.nn.Linear4bit(
                module.in_features, module.out_features, module.bias is not None, compute_dtype=compute_dtype,
                compress_statistics=True, quant_type="nf4",
            )  # fmt: skip
        else:
            new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, module.bias is not None,
                                      has_fp16_weights=False, threshold=6.0)  # fmt: skip
        new.load_state_dict(module.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new.to(device))  # .to quantizes
        names.append(name)
    model.to(device)  # the rest (embeddings, norms, the head) stays in full precision
    for param in model.parameters():
        param.requires_grad_(False)
    return names


def bnb_config(quantize: str, skip: list[str], compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for `quantize`, leaving the modules in `skip` in full precision."""
    from transformers import BitsAndBytesConfig

    _bitsandbytes()
    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip,
        )  # fmt: skip
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"unknown quantization {quantize!r}: use {' or '.join(QUANTIZE)}")


def keep_training_layout(model: nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight into an inference layout at the
    first forward without gradients (an evaluation) and keeps it, and its training forward then fails
    in that layout (bitsandbytes 0.50). A model that trains and evaluates in turn keeps one layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantization(module: nn.Module) -> str | None:
    """'4-bit' or '8-bit' for a bitsandbytes-quantized linear, None for a plain one."""
    return QUANTIZED_WEIGHTS.get(type(getattr(module, "weight", None)).__name__)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a layer as stored, as a plain tensor: bitsandbytes weights dequantized to (out, in)."""
    weight = module.weight
    kind = quantization(module)
    if kind == "4-bit" and getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place at its first
            # inference forward; undo that on copies (the inverse changes the state it is given).
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnbf.dequantize_4bit(data, state)
    if kind == "8-bit":
        # The row scales live on the weight until the first forward, then on the layer's state.
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = getattr(getattr(module, "state", None), "SCB", None)
        if scales is not None:
            import bitsandbytes.functional as bnbf

            return bnbf.int8_vectorwise_dequant(weight.data, scales)
    return weight.data


def why_not_merge_quantized(kind: str) -> str:
    """Why LoRA is not merged into a bitsandbytes base of `kind` ('4-bit' or '8-bit')."""
    return (
        f"a {kind} bitsandbytes base: the merged weight W + BA would have to be quantized "
        "again, and that rounding is as large as the small update itself, so the merge would "
        "lose the adapter and unmerge could not restore W. Keep the adapter unmerged (it runs "
        "as it is), or call unload_lora(model), which dequantizes each base into a plain "
        "nn.Linear copy and merges there"
    )
