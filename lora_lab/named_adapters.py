"""Several named adapters on one model, as PEFT users know them.

Add one beside another with ``inject_lora(..., name="b")`` or ``load_adapter(model, path, name="b")``;
switch with `set_adapter`, drop one with `delete_adapter`, merge, unload or save one by name
(`merge_lora`, `unload_lora`, `save_adapter`, `export_peft_adapter` take ``name=``), and combine
several into a new one with `add_weighted_adapter`.

Each wrapper runs one adapter, the one in its `lora`; the others wait in its `others` (a ModuleDict
by name), frozen, and switching swaps them. So the forward, the fused node, DoRA and everything that
reads `wrapper.lora` see one adapter as before, and a model with one adapter keeps the state dict it
always had. A layer that lacks the active adapter (adapters may target different layers) runs its
base, as in PEFT. One adapter runs at a time: to run two together, combine them (weights 1 and 1 give
their exact sum). An nn.MultiheadAttention wrapper holds one adapter (two branches already). The
model's state dict follows the switch (``<layer>.lora.A`` is the running adapter's): save and load
adapters by name with `save_adapter` / `load_adapter`.

Refused rather than run wrong: adapters beside one started by PiSSA / OLoRA (its layers' bases hold a
residual the others would run over), and loading an adapter's whole modules (a head) into a model
with other adapters (lora_lab keeps one copy of such a module, PEFT one per adapter).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .layers import MultiheadAttentionWithLoRA
from .lora import LayerWithLoRA, LoRALayer, lora_modules
from .targets import replace_module

DEFAULT_ADAPTER = "default"  # the name an adapter gets when none is given, as in PEFT


def check_adapter_name(name: object) -> str:
    """Return `name` if it can name an adapter (a key of the wrappers' `others`), else raise."""
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict(), name):
        raise ValueError(
            f"adapter name {name!r}: use a non-empty string without '.' that is not an attribute of "
            "nn.ModuleDict ('train', 'to', 'keys'...), e.g. 'sql' or 'v2'"
        )
    return name


def refuse_beside_principal(model: nn.Module, name: str) -> None:
    """Raise if `model` holds an adapter started by PiSSA / OLoRA other than `name`: that layer's base
    holds the residual W - scaling B0 A0, which every other adapter would run over (PEFT runs it so)."""
    started = sorted({n for _, w in lora_modules(model) for n in _names(w) if _principal(adapter_layer(w, n))})
    if started and started != [name]:
        raise ValueError(
            f"the model holds adapter(s) {started} started by PiSSA / OLoRA, whose layers' bases hold the residual "
            f"W - scaling B0 A0 that adapter {name!r} would run over instead of W. Save them (the file is converted "
            "to the original base), load them into a fresh model, and add adapters there"
        )


def _names(wrapper: LayerWithLoRA) -> list[str]:
    return [wrapper.adapter_name, *wrapper.others]


def _principal(lora: LoRALayer) -> bool:
    return getattr(lora, "A0", None) is not None


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters `model` holds, sorted (PEFT's order for choosing the next one)."""
    return sorted({n for _, w in lora_modules(model) for n in _names(w)})


def check_held(model: nn.Module, name: str) -> list[str]:
    """The model's adapter names, if `name` is one of them; else a ValueError naming those it holds."""
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"the model holds no adapter named {name!r}; it holds {names or 'none'}")
    return names


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter `model` runs, or None if it holds none."""
    active = sorted({w.adapter_name for _, w in lora_modules(model) if w.active})
    if len(active) > 1:  # only wrappers put together by hand get here
        raise ValueError(f"the model's layers run different adapters {active}: call set_adapter(model, name)")
    return active[0] if active else None


def holds(wrapper: LayerWithLoRA, name: str) -> bool:
    return name == wrapper.adapter_name or name in wrapper.others


@contextmanager
def looking_at(wrapper: LayerWithLoRA, name: str) -> Iterator[LayerWithLoRA]:
    """`wrapper` with adapter `name` in `lora` for the while, nothing else changed: to check it."""
    held = wrapper._modules["lora"]
    wrapper._modules["lora"] = adapter_layer(wrapper, name)
    try:
        yield wrapper
    finally:
        wrapper._modules["lora"] = held


def adapter_layer(wrapper: LayerWithLoRA, name: str | None = None) -> LoRALayer:
    """The `LoRALayer` of adapter `name` in `wrapper` (default: the one in `lora`)."""
    return wrapper.lora if name is None or name == wrapper.adapter_name else wrapper.others[name]


def use_adapter(wrapper: LayerWithLoRA, name: str) -> None:
    """Put adapter `name` into `wrapper.lora` to run, or leave the layer running its base if it lacks it."""
    if name in wrapper.others:
        lora = wrapper.others.pop(name)
        wrapper.others[wrapper.adapter_name] = wrapper.lora.requires_grad_(False)  # waiting ones never train
        wrapper.lora, wrapper.adapter_name = lora, name
    wrapper.active = name == wrapper.adapter_name


def check_addable(wrapper: LayerWithLoRA, name: str) -> None:
    """Raise a ValueError if `wrapper` cannot take another adapter called `name`."""
    if holds(wrapper, name):
        raise ValueError(f"already holds an adapter named {name!r}")
    if wrapper.merged:
        raise ValueError("is merged: call unmerge_lora(model) before adding an adapter beside the merged one")
    if isinstance(wrapper, MultiheadAttentionWithLoRA):
        raise ValueError("an nn.MultiheadAttention wrapper holds one adapter; leave this layer out of the second one")
    if any(_principal(held) for held in (wrapper.lora, *wrapper.others.values())):
        raise ValueError(
            "was started by PiSSA / OLoRA: its base holds the residual W - scaling B0 A0, which another adapter "
            "would adapt instead of W. Add adapters to layers started with the plain init"
        )


def add_to_wrapper(wrapper: LayerWithLoRA, name: str, lora: LoRALayer) -> None:
    """Hold `lora` as adapter `name` of `wrapper`, frozen and waiting (see `set_adapter`)."""
    check_addable(wrapper, name)
    wrapper.others[name] = lora.requires_grad_(False)


def set_adapter(model: nn.Module, name: str) -> None:
    """Run adapter `name`: its tensors train, the others wait frozen (as PEFT's `set_adapter`).
    Layers without it run their base; a merged model is unmerged first."""
    check_held(model, name)
    for _, wrapper in lora_modules(model):
        wrapper.unmerge()
        use_adapter(wrapper, name)
        for child_name, child in wrapper.named_children():
            if child_name not in ("base", "others"):
                child.requires_grad_(wrapper.active)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer (a layer left without any becomes its base again). If it
    was the active one, the first remaining name in sorted order becomes active on every layer (PEFT
    picks it per layer, so where layers hold different adapters its layers can end up running different
    ones)."""
    names = check_held(model, name)
    merged = [n for n, w in lora_modules(model) if w.merged and w.adapter_name == name]
    if merged:
        raise ValueError(f"adapter {name!r} is merged into {merged[:4]}: call unmerge_lora(model) first")
    active = active_adapter(model)
    for _, wrapper in list(lora_modules(model)):
        if name in wrapper.others:
            del wrapper.others[name]
        elif wrapper.adapter_name == name and wrapper.others:
            wrapper.adapter_name = sorted(wrapper.others)[0]
            wrapper.lora = wrapper.others.pop(wrapper.adapter_name)
        elif wrapper.adapter_name == name:
            replace_module(model, wrapper, wrapper.base)
    rest = [n for n in names if n != name]
    if active == name and rest:
        set_adapter(model, rest[0])
    elif active is not None and active != name:
        for _, wrapper in lora_modules(model):
            use_adapter(wrapper, active)


def add_weighted_adapter(
    model: nn.Module, adapters: Sequence[str], weights: Sequence[float], name: str, combination_type: str = "cat"
) -> None:
    """Add adapter `name` = sum_i weights[i] * (update of adapters[i]), exactly, as PEFT's
    ``add_weighted_adapter(..., combination_type="cat")``: on each layer, A is the stacked
    ``weight_i * scaling_i * A_i`` and B the side-by-side B_i, so its rank is the sum of the ranks there
    and its scaling 1 (alpha = rank). It is added waiting; `set_adapter(model, name)` runs it. (PEFT
    keeps the first adapter's rsLoRA flag for the combination, so where that one is rsLoRA its scaling
    is sqrt(rank), not 1: lora_lab keeps the exact sum there and PEFT does not.)

    Refused, by layer: DoRA (the magnitudes do not add) and lora_bias adapters, grouped convolutions
    (the rank slices would mix groups), nn.MultiheadAttention (one adapter a layer) and PiSSA / OLoRA
    starts. PEFT's other combination types approximate (an SVD, a mean of factors) and are not here."""
    if combination_type != "cat":
        raise ValueError(
            f"combination_type={combination_type!r}: lora_lab combines adapters exactly, with 'cat' only (PEFT's "
            "'svd', 'linear', 'ties' and the others truncate or average factors, which changes the update)"
        )
    names = adapter_names(model)
    unknown = [a for a in adapters if a not in names]
    if unknown or not adapters:
        raise ValueError(f"adapters {list(adapters)}: {unknown or 'none given'} not in the model's {names}")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights: give one weight per adapter")
    if name in names:
        raise ValueError(f"the model already holds an adapter named {name!r}: choose a new name")
    check_adapter_name(name)
    refuse_beside_principal(model, name)
    plan, problems = {}, []
    for layer, wrapper in lora_modules(model):
        present = [
            (adapter_layer(wrapper, a), float(w)) for a, w in zip(adapters, weights, strict=True) if holds(wrapper, a)
        ]
        if not present:
            continue
        problem = _combine_problem(wrapper, [lora for lora, _ in present])
        if problem:
            problems.append(f"{layer}: {problem}")
        plan[wrapper] = present
    if problems:
        raise ValueError("cannot combine these adapters exactly:\n  - " + "\n  - ".join(problems))
    with torch.no_grad():
        for wrapper, present in plan.items():
            a = torch.cat([lora.A * weight * lora.scaling for lora, weight in present])  # PEFT's order of products
            b = torch.cat([lora.B for lora, _ in present], dim=1)
            first = present[0][0]
            p = first.dropout.p if first.dropout is not None else 0.0
            combined = LoRALayer(
                first.in_features, first.out_features, a.shape[0], a.shape[0], p, device=a.device, dtype=a.dtype
            )
            combined.A.copy_(a)
            combined.B.copy_(b)
            wrapper.others[name] = combined.train(wrapper.training).requires_grad_(False)


def _combine_problem(wrapper: LayerWithLoRA, loras: list[LoRALayer]) -> str | None:
    if isinstance(wrapper, MultiheadAttentionWithLoRA):
        return "nn.MultiheadAttention holds one adapter, so there is nothing to combine it with"
    for lora in loras:
        if lora.magnitude is not None:
            return "a DoRA adapter: its magnitudes rescale W + delta W per channel, so updates do not add"
        if lora.bias is not None:
            return "an adapter with lora_bias"
        if lora.groups > 1:
            return "a grouped convolution"
        if _principal(lora):
            return "started by PiSSA / OLoRA over a residual base"
    return None
