"""Putting LoRA into a model: one pass, `inject_lora`, wraps the modules that the targets select
(`targets.py`) in any `torch.nn.Module`, in place, each with the wrapper of its kind (`layers.py`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from .layers import update_width, wrapper_class
from .lora import LayerWithLoRA, check_alpha, check_rank, linear_shape, lora_modules
from .named_adapters import (
    DEFAULT_ADAPTER,
    active_adapter,
    adapter_names,
    add_to_wrapper,
    check_adapter_name,
    check_addable,
    refuse_beside_principal,
    use_adapter,
)
from .quantize import quantization
from .targets import (
    WRAPPED_KINDS,
    Targets,
    find_targets,
    fold_layer_names,
    name_matches,
    refuse_bypassed,
    replace_module,
)
from .variants import INITS, start_adapter

BIAS_SETTINGS = ("none", "lora_only", "all")  # PEFT's `bias`: which base biases train beside LoRA


@dataclass(frozen=True)
class LoRASettings:
    """How one module is wrapped."""

    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False


def _pattern_value(pattern: Mapping[str, float], name: str, default: float) -> float:
    """The value of the most specific (longest) key of `pattern` that matches `name`."""
    keys = [k for k in pattern if name_matches(name, k)]
    return pattern[max(keys, key=len)] if keys else default


def place_wrappers(model: nn.Module, wrappers: Mapping[str, LayerWithLoRA]) -> list[str]:
    """Put wrappers from `build_wrappers` in place of the modules they wrap; where a module is wrapped
    already, the new adapter joins it instead, waiting (`named_adapters.py`). Returns their names.
    A model that runs an adapter keeps running it: new wrappers of another adapter wait too."""
    active = active_adapter(model)
    modules = dict(model.named_modules())
    for name, wrapper in wrappers.items():
        held = modules[name]
        if isinstance(held, LayerWithLoRA):
            add_to_wrapper(held, wrapper.adapter_name, wrapper.lora)
            if wrapper.adapter_name == active:  # the model runs this adapter: so does the layer now
                use_adapter(held, active)
                held.lora.requires_grad_(True)
            continue
        parent = modules[name.rpartition(".")[0]]
        if isinstance(parent, nn.TransformerEncoderLayer):
            # Its inference fast path (eval, no grad) reads linear1/linear2.weight directly and
            # would skip the adapter; torch leaves that path when a submodule has forward hooks.
            wrapper.register_forward_pre_hook(_no_fast_path)
        replace_module(model, wrapper.base, wrapper)
        if active is not None and active != wrapper.adapter_name:
            use_adapter(wrapper, active)
            wrapper.lora.requires_grad_(False)
        if wrapper.lora.magnitude is not None:
            # nn.TransformerEncoder turns a padded batch into a nested tensor in eval, and DoRA's
            # per-channel rescaling cannot take one: padded batches then run dense, as in training.
            for encoder in model.modules():
                if isinstance(encoder, nn.TransformerEncoder) and any(m is wrapper for m in encoder.modules()):
                    encoder.use_nested_tensor = False
    _enable_input_require_grads(model)
    return list(wrappers)


def build_wrappers(
    model: nn.Module, plan: Mapping[str, LoRASettings], adapter: str = DEFAULT_ADAPTER
) -> dict[str, LayerWithLoRA]:
    """The wrappers holding adapter `adapter` for the modules named in `plan`, built but not put in
    place (for a module wrapped already: around its base, to give it the new adapter). Each takes the
    train/eval mode of the module it wraps (a model in eval mode stays deterministic)."""
    refuse_bypassed(model, plan)
    modules = dict(model.named_modules())
    wrappers = {}
    for name, s in plan.items():
        module = modules[name]
        layer = module.base if isinstance(module, LayerWithLoRA) else module
        kind = wrapper_class(layer)
        try:
            if kind is None:
                raise TypeError(f"is {type(module).__name__}, a kind of layer LoRA does not wrap ({WRAPPED_KINDS})")
            if isinstance(module, LayerWithLoRA):
                check_addable(module, adapter)
            wrapper = kind(layer, s.rank, s.alpha, s.dropout, s.use_rslora, lora_bias=s.lora_bias, use_dora=s.use_dora)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{name}: {err}") from None
        wrapper.adapter_name = adapter
        wrappers[name] = wrapper.train(module.training)
    return wrappers


def _no_fast_path(module: nn.Module, args: tuple) -> None:
    """An empty forward pre-hook: its presence turns off nn.TransformerEncoderLayer's fast path."""


def _enable_input_require_grads(model: nn.Module) -> None:
    """Make a Hugging Face model's input embeddings return tensors that require grad, as PEFT
    does: with reentrant gradient checkpointing and a frozen base, a checkpointed block whose
    input does not require grad returns outputs that do not either, and no LoRA layer would get
    a gradient."""
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable) and getattr(model, "_require_grads_hook", None) is None:
        try:
            enable()
        except NotImplementedError:  # a model without input embeddings: nothing to hook
            pass


def inject_lora(
    model: nn.Module,
    targets: Targets,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    *,
    use_dora: bool = False,
    lora_bias: bool = False,
    init: str = "kaiming",
    name: str = DEFAULT_ADAPTER,
) -> list[str]:
    """Wrap the modules that `targets` selects with LoRA, in place: linears, embeddings,
    convolutions and nn.MultiheadAttention, each with its kind of wrapper (`layers.wrapper_class`).

    `targets`: a list of names (qualified, or a dotted suffix such as ``"W_query"`` or
    ``"attn.c_attn"``), ``"all-linear"`` (every linear-like module but the output head), or a
    callable ``(name, module) -> bool``. `rank_pattern` / `alpha_pattern` give other ranks or
    alphas to the modules their keys match (same matching; the longest matching key wins).
    `use_dora`: DoRA's magnitude per output channel (`variants.py`); `lora_bias`: a trainable bias
    on B, as PEFT's options of those names. `init`: how A and B start (`variants.INITS`): "kaiming"
    (PEFT's default), "gaussian", or "pissa" / "olora", which start from W's principal directions
    and leave the residual in the base (linears only; saving converts, see `adapters.save_adapter`).
    `name`: the adapter's name. Targets that hold an adapter already get this one beside it, waiting
    until ``set_adapter(model, name)`` (`named_adapters.py`); a model without one runs it at once.
    The wrapped base layers are frozen; everything else keeps its `requires_grad` (see
    `mark_only_lora_trainable`). Returns the qualified names of the wrapped modules.
    """
    check_rank(rank)
    check_alpha(alpha)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: use one of {', '.join(INITS)}")
    check_adapter_name(name)
    refuse_beside_principal(model, name)
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    for key, value in rank_pattern.items():
        check_rank(value, f"rank_pattern[{key!r}]")
    for key, value in alpha_pattern.items():
        check_alpha(value, f"alpha_pattern[{key!r}]")
    names = find_targets(model, targets, name)
    for what, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        stray = [k for k in pattern if not any(name_matches(n, k) for n in names)]
        if stray:
            raise ValueError(f"{what} key(s) {stray} match none of the targeted modules {names}")
    modules = dict(model.named_modules())
    too_wide = {}
    for n in names:
        width = update_width(modules[n])
        if _pattern_value(rank_pattern, n, rank) > width:
            too_wide[n] = width
    if init in ("pissa", "olora"):
        _check_principal_init(model, names, init, too_wide, [n for n in adapter_names(model) if n != name])
    if too_wide:
        shown = fold_layer_names(too_wide)
        warnings.warn(
            f"LoRA rank above the layer width on {len(too_wide)} module(s) ({', '.join(shown[:6])}; the narrowest "
            f"side is {min(too_wide.values())}): B @ A cannot have a rank above min(in, out), so the extra "
            "parameters add no capacity",
            stacklevel=2,
        )
    plan = {
        n: LoRASettings(
            int(_pattern_value(rank_pattern, n, rank)),
            _pattern_value(alpha_pattern, n, alpha),
            dropout,
            use_rslora,
            use_dora,
            lora_bias,
        )
        for n in names
    }
    _warn_tied_twins(model, names)
    built = build_wrappers(model, plan, name)
    if init != "kaiming":
        for wrapper in built.values():
            start_adapter(wrapper, init)
    return place_wrappers(model, built)


def _warn_tied_twins(model: nn.Module, names: list[str]) -> None:
    """Warn when a target shares its weight with another module of its kind that is not a target:
    that twin keeps running the base weight, and where the model calls the twin instead (T5's
    `encoder.embed_tokens` and `decoder.embed_tokens` beside `shared`) the adapter never runs."""
    modules = dict(model.named_modules())
    twins = {}
    for name in names:
        weight = getattr(modules[name], "weight", None)
        others = [n for n, m in modules.items() if n not in names and m is not modules[name]
                  and type(m) is type(modules[name]) and getattr(m, "weight", None) is weight]  # fmt: skip
        if others and weight is not None:
            twins[name] = others
    if twins:
        shown = "; ".join(f"{n}: {', '.join(o)}" for n, o in twins.items())
        warnings.warn(
            f"targets share their weight with modules of the same kind that are not targets ({shown}); those keep "
            "the base weight, and the adapter does not run where the model calls them: target them too",
            stacklevel=3,
        )


def _check_principal_init(model: nn.Module, names: list[str], init: str, too_wide, others: list[str]) -> None:
    """PiSSA / OLoRA rewrite a float linear's own weight (which no other adapter may run over) and need
    rank <= min(in, out): refuse the rest first."""
    modules = dict(model.named_modules())
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    held = [n for n in names if isinstance(modules[n], LayerWithLoRA)]
    bad = [f"{n} (holds an adapter, which adapts the weight they rewrite)" for n in held]
    bad += [f"{n} ({type(modules[n]).__name__})" for n in names if n not in held and linear_shape(modules[n]) is None]
    bad += [f"{n} (quantized)" for n in names if quantization(modules[n]) is not None]
    bad += [f"{n} (weight shared, tied)" for n in names if owners[id(getattr(modules[n], "weight", None))] > 1]
    problems = [f"{init} starts linears with float weights (as PEFT), not {bad}"] if bad else []
    problems += [f"the rank is above the width of {sorted(too_wide)}"] if too_wide else []
    problems += [f"the model holds other adapters {others}, which would run over the residual base"] if others else []
    if problems:
        raise ValueError(f"init={init!r}: " + "; ".join(problems))


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float) -> list[str]:
    """The book's one-liner ("Build a Large Language Model (From Scratch)", appendix E): wrap
    every `nn.Linear`, the output head included. Note the scaling here is alpha / rank (as in the
    LoRA paper and PEFT) where the book multiplies by alpha alone."""
    return inject_lora(model, lambda _, m: isinstance(m, nn.Linear), rank, alpha)


def mark_only_lora_trainable(model: nn.Module, train: Iterable[str] = (), bias: str = "none") -> None:
    """Freeze every parameter but the LoRA ones of the adapter in use (`named_adapters.py`) and
    those of the modules named in `train` (same name matching as targets, e.g. a new classification head).

    `bias`, as PEFT's: ``"none"``; ``"lora_only"``, the biases of the wrapped base layers train
    too; ``"all"``, every parameter called ``bias`` in the model trains too."""
    if bias not in BIAS_SETTINGS:
        raise ValueError(f"bias={bias!r}: use one of {BIAS_SETTINGS} (which base biases train beside LoRA)")
    keys = [train] if isinstance(train, str) else list(train)
    named = dict(model.named_modules())
    hits = {k: [m for n, m in named.items() if n and name_matches(n, k)] for k in keys}
    unmatched = [k for k, found in hits.items() if not found]
    if unmatched:
        top = [n for n, _ in model.named_children()]
        raise ValueError(
            f"train={unmatched} match no module of {type(model).__name__}; its top-level modules are {top} "
            "(name a module or a dotted suffix of its name, e.g. the head you added)"
        )
    model.requires_grad_(False)
    for _, wrapper in lora_modules(model):
        for child_name, child in wrapper.named_children():
            child.requires_grad_(child_name not in ("base", "others") and wrapper.active)  # the adapter in use
        # PEFT's "lora_only" trains the bias of each layer it wraps: for attention, out_proj's
        owner = wrapper.base.out_proj if isinstance(wrapper.base, nn.MultiheadAttention) else wrapper.base
        if bias == "lora_only" and getattr(owner, "bias", None) is not None:
            owner.bias.requires_grad_(True)
    if bias == "all":
        for module in model.modules():
            if isinstance(module._parameters.get("bias"), nn.Parameter):
                module.bias.requires_grad_(True)
    for found in hits.values():
        for module in found:
            module.requires_grad_(True)
