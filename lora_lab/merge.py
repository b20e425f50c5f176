"""Taking LoRA in and out of a model's weights: merge, unmerge, unload, and disable for a while.

Every wrapper is checked before any is changed, so a model is merged whole or not at all: a tied
weight (merging would change its twin too), a quantized base, a non-finite update or a grouped
convolution is named in one error with every other problem.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .lora import LayerWithLoRA, lora_modules
from .named_adapters import check_held, holds, looking_at, set_adapter
from .targets import replace_module


def _merge_problems(model: nn.Module, allow_quantized: bool = False, name: str | None = None) -> list[str]:
    """Why each wrapper that is not merged yet cannot merge its active adapter (or adapter `name`): a
    weight shared with another module (tied head and embedding: merging would change both), a
    quantized base, a non-finite update."""
    owners: dict[int, dict[int, str]] = {}  # a parameter -> the modules holding it (one module under two names: once)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for key, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), {}).setdefault(id(module), f"{module_name}.{key}".lstrip("."))
    problems = []
    for layer, wrapper in lora_modules(model):
        adapter = name or wrapper.adapter_name
        if not (holds(wrapper, adapter) and (name or wrapper.active)):  # nothing to merge here
            continue
        if wrapper.merged and wrapper.adapter_name == adapter:
            continue
        with looking_at(wrapper, adapter):
            problems += _wrapper_problems(layer, wrapper, owners, allow_quantized)
    return problems


def _wrapper_problems(name: str, wrapper: LayerWithLoRA, owners: dict, allow_quantized: bool) -> list[str]:
    problems = []
    holders = [owners.get(id(w), {}) for w in wrapper.merged_weights()]
    shared = [n for held in holders for n in held.values()]
    if any(len(held) > 1 for held in holders):
        problems.append(
            f"{name}: its weight is shared with {shared} (tied weights), so merging would change "
            "those too. Untie it first (give it its own copy with nn.Parameter(w.detach().clone())) "
            "or keep the adapter unmerged"
        )
    problem = wrapper.merge_problem(allow_quantized)
    if problem is not None:
        problems.append(f"{name}: {problem}")
    return problems


def _check_mergeable(model: nn.Module, what: str, allow_quantized: bool = False, name: str | None = None) -> None:
    """Raise one error naming every wrapper that cannot merge, before anything is changed."""
    if name is not None:
        check_held(model, name)
    problems = _merge_problems(model, allow_quantized, name)
    if problems:
        raise ValueError(
            f"cannot {what}: {len(problems)} LoRA layer(s) cannot merge, so nothing was changed:\n  - "
            + "\n  - ".join(problems)
        )


def merge_lora(model: nn.Module, name: str | None = None) -> None:
    """Merge every LoRA update of the active adapter (or of adapter `name`, which becomes the active
    one) into its base weight; the forward then costs what the base does. Every wrapper is checked
    first: if any cannot merge, none is merged and the error names all."""
    _check_mergeable(model, "merge", name=name)
    if name is not None:
        set_adapter(model, name)
    for _, wrapper in lora_modules(model):
        wrapper.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora`, so the adapters can train again or be switched off."""
    for _, wrapper in lora_modules(model):
        wrapper.unmerge()


def unload_lora(model: nn.Module, dtype: torch.dtype | None = None, name: str | None = None) -> nn.Module:
    """Replace every wrapper with a plain module holding the merged weights of the active adapter
    (or of adapter `name`; the others are dropped, as PEFT's ``merge_and_unload(adapter_names=[name])``),
    and return the model.

    A quantized base is dequantized into a new `nn.Linear` (in `dtype`, default the layer's
    compute dtype or fp32) before the merge, since merging into 4/8-bit weights would round the
    update away. Like `merge_lora`, it checks every wrapper first and changes nothing if any fails.
    """
    _check_mergeable(model, "unload", allow_quantized=True, name=name)
    if name is not None:
        set_adapter(model, name)
    if isinstance(model, LayerWithLoRA):
        return model.unloaded(dtype)
    for _, wrapper in list(lora_modules(model)):
        replace_module(model, wrapper, wrapper.unloaded(dtype))
    return model


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (merged adapters are taken out for the while). A
    layer started by PiSSA / OLoRA runs its residual base W - scaling B0 A0 then, as PEFT's does.
    Modules that an adapter replaced whole (a trained head loaded with `extra=` / PEFT's
    `modules_to_save`) are part of the model and stay; PEFT's `disable_adapter` swaps them back."""
    wrappers = [w for _, w in lora_modules(model)]
    states = [(w.merged, w.enabled) for w in wrappers]
    try:
        for w in wrappers:
            w.unmerge()
            w.enabled = False
        yield model
    finally:
        for w, (merged, enabled) in zip(wrappers, states, strict=True):
            w.enabled = enabled
            if merged:
                w.merge()
