"""Putting LoRA into a model and taking it out again.

One pass, `inject_lora`, wraps the chosen linear-like modules of any `torch.nn.Module` in place.
Modules are chosen by name: a target matches a module whose qualified name equals it or ends
with ``"." + target`` (so ``"W_query"``, ``"att.W_query"`` and ``"trf_blocks.0.att.W_query"`` all
name that layer), as in PEFT's `target_modules` list.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from .layers import update_width, wrapper_class
from .lora import LayerWithLoRA, check_alpha, check_rank, linear_shape, lora_modules
from .quantize import quantization
from .variants import INITS, start_adapter

Targets = str | Sequence[str] | Callable[[str, nn.Module], bool]
ALL_LINEAR = "all-linear"
WRAPPED_KINDS = (
    "nn.Linear, transformers Conv1D, bitsandbytes Linear4bit/Linear8bitLt, nn.Embedding, "
    "nn.Conv1d/2d/3d and nn.MultiheadAttention"
)
# Names under which models keep their output head, when `get_output_embeddings` does not say.
# Classification heads: new layers that train whole (PEFT's modules_to_save), never LoRA-wrapped.
CLASSIFIER_NAMES = ("classifier", "score", "qa_outputs", "classification_head")
HEAD_NAMES = ("out_head", "lm_head", "head", *CLASSIFIER_NAMES)
# Parents that read a child linear's weight directly instead of calling the child, so a LoRA
# wrapper there would never run: nn.MultiheadAttention hands out_proj.weight (and its own
# in_proj_weight) to F.multi_head_attention_forward. The parent itself is wrapped instead.
_BYPASSING_PARENTS: dict[type[nn.Module], tuple[str, ...]] = {nn.MultiheadAttention: ("out_proj",)}
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


def name_matches(name: str, key: str) -> bool:
    """True if `key` is the qualified `name` or a dotted suffix of it."""
    return name == key or name.endswith("." + key)


def output_head_name(model: nn.Module) -> str | None:
    """The qualified name of the model's output head, which `"all-linear"` never wraps: what
    `get_output_embeddings()` returns (Hugging Face language models), else a top-level child
    called one of `HEAD_NAMES` that is or holds linears (a classifier, trained whole instead:
    RoBERTa's `classifier` with its `dense` and `out_proj`). This is PEFT's selection for
    `task_type="SEQ_CLS"` and for causal and masked language models."""
    get_head = getattr(model, "get_output_embeddings", None)
    try:
        head = get_head() if callable(get_head) else None
    except NotImplementedError:
        head = None
    if head is not None:
        for name, module in model.named_modules():
            if module is head:
                return name
    for name, module in model.named_children():
        if name in HEAD_NAMES and any(_is_linear(m) for m in module.modules()):
            return name
    return None


def classifier_head_name(model: nn.Module) -> str | None:
    """The model's output head if it is a classification head (`CLASSIFIER_NAMES`), else None."""
    head = output_head_name(model)
    return head if head in CLASSIFIER_NAMES else None


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named submodules that a target may match: not the root, nothing inside a wrapper, nor the
    modules torch's parametrizations (weight_norm...) keep under ``parametrizations.``."""
    inside: str | None = None
    for name, module in model.named_modules():
        if not name or (inside is not None and name.startswith(inside)) or ".parametrizations." in f".{name}":
            continue
        inside = name + "." if isinstance(module, LayerWithLoRA) else inside
        yield name, module


def _bypassed(model: nn.Module) -> dict[str, str]:
    """Linear modules whose parent reads their weight directly, with the reason: name -> why."""
    found = {}
    for parent_name, parent in model.named_modules():
        for kind, children in _BYPASSING_PARENTS.items():
            if isinstance(parent, kind):
                for child in children:
                    name = f"{parent_name}.{child}" if parent_name else child
                    found[name] = parent_name
    return found


def _is_linear(module: nn.Module) -> bool:
    return (
        linear_shape(module) is not None or isinstance(module, LayerWithLoRA) and linear_shape(module.base) is not None
    )


def _adaptable(module: nn.Module) -> bool:
    return wrapper_class(module) is not None or isinstance(module, LayerWithLoRA)


def fold_layer_names(names: Iterable[str]) -> list[str]:
    """`names` with layer indices folded to N (``blocks.0.att`` and ``blocks.1.att`` -> ``blocks.N.att``),
    each once, in order: what error messages list."""
    return list(dict.fromkeys(re.sub(r"(^|\.)\d+(?=\.|$)", r"\1N", name) for name in names))


def _linear_names_summary(model: nn.Module, limit: int = 20) -> str:
    """The names of the modules of `model` that LoRA can wrap, layer indices folded to N, for errors."""
    bypassed = _bypassed(model)
    names = fold_layer_names(n for n, m in _candidates(model) if _adaptable(m) and n not in bypassed)
    if not names:
        return f"the model has no layer LoRA wraps ({WRAPPED_KINDS})"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return "the layers LoRA can wrap are: " + ", ".join(names[:limit]) + more


def find_targets(model: nn.Module, targets: Targets) -> list[str]:
    """The qualified names that `targets` selects, in model order, checked: every name must match
    something, every match must be a layer kind LoRA wraps and not wrapped yet."""
    candidates = list(_candidates(model))
    if isinstance(targets, str) and targets == ALL_LINEAR:
        chosen = _all_linear(model, candidates)
    elif callable(targets):
        chosen = [(n, m) for n, m in candidates if targets(n, m)]
    else:
        chosen = _by_name(model, candidates, targets)
    if not chosen:
        raise ValueError(f"targets {targets!r} select no module; {_linear_names_summary(model)}")
    wrapped = [n for n, m in chosen if isinstance(m, LayerWithLoRA)]
    if wrapped:
        raise ValueError(
            f"already wrapped with LoRA: {wrapped}. Wrap each module once: call unload_lora(model) "
            "first to start again, or target only the modules that are not wrapped yet."
        )
    not_wrappable = [f"{n} ({type(m).__name__})" for n, m in chosen if wrapper_class(m) is None]
    if not_wrappable:
        raise ValueError(
            f"targets match modules that LoRA does not wrap: {not_wrappable}. lora_lab wraps {WRAPPED_KINDS}; "
            f"name those inside instead ({_linear_names_summary(model)})."
        )
    _refuse_bypassed(model, [n for n, _ in chosen])
    return [n for n, _ in chosen]


def _refuse_bypassed(model: nn.Module, names: Iterable[str]) -> None:
    bypassed = _bypassed(model)
    never_run = [n for n in names if n in bypassed]
    if never_run:
        parent = bypassed[never_run[0]] or "the model itself"
        raise ValueError(
            f"cannot adapt {never_run} alone: nn.MultiheadAttention reads out_proj.weight directly inside "
            f"F.multi_head_attention_forward, so a wrapper there would never run. Target the attention module "
            f"itself ({parent!r}): that adapts its in_proj_weight and out_proj together, as PEFT does."
        )


def _all_linear(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Every linear-like module but the output head; an nn.MultiheadAttention, whose out_proj it
    would otherwise name and never run, is taken whole (its in_proj and out_proj)."""
    head = output_head_name(model)
    in_head = (lambda n: n == head or n.startswith(head + ".")) if head else (lambda n: False)
    bypassed = _bypassed(model)
    modules = dict(candidates)
    chosen = []
    for name, module in candidates:
        if _is_linear(module) and not in_head(name):
            parent = bypassed.get(name)
            if parent == "":
                raise ValueError(
                    f"the model is a {type(model).__name__} itself, which cannot be replaced in place: wrap it "
                    "directly, MultiheadAttentionWithLoRA(model, rank, alpha), or inject into a model that holds it"
                )
            chosen.append((name, module) if parent is None else (parent, modules[parent]))
    return list(dict(chosen).items())


def _by_name(model: nn.Module, candidates: list[tuple[str, nn.Module]], targets) -> list[tuple[str, nn.Module]]:
    """The modules a name or list of names selects (qualified names or dotted suffixes), each name
    matching something."""
    keys = [targets] if isinstance(targets, str) else list(targets)
    if not keys:
        raise ValueError("targets is empty: name at least one module, or use 'all-linear'")
    if ALL_LINEAR in keys:
        raise ValueError(
            f"'{ALL_LINEAR}' stands alone: it already takes every linear but the output head. "
            f"Give '{ALL_LINEAR}' or a list of module names, not both (got {keys})"
        )
    unmatched = [k for k in keys if not any(name_matches(n, k) for n, _ in candidates)]
    if unmatched:
        linears = [n for n, m in candidates if _is_linear(m)]
        example = f" (e.g. '{linears[0].rsplit('.', 1)[-1]}')" if linears else ""
        raise ValueError(
            f"target(s) {unmatched} match no module of {type(model).__name__}; "
            f"{_linear_names_summary(model)}. Use a qualified name or a dotted suffix of one{example}, "
            f"a list of them, '{ALL_LINEAR}', or a callable (name, module) -> bool."
        )
    return [(n, m) for n, m in candidates if any(name_matches(n, k) for k in keys)]


def _pattern_value(pattern: Mapping[str, float], name: str, default: float) -> float:
    """The value of the most specific (longest) key of `pattern` that matches `name`."""
    keys = [k for k in pattern if name_matches(name, k)]
    return pattern[max(keys, key=len)] if keys else default


def wrap_modules(model: nn.Module, plan: Mapping[str, LoRASettings]) -> list[str]:
    """Wrap the modules named exactly in `plan` with their settings. All wrappers are built before
    any is put in place, so a bad setting leaves the model untouched."""
    return place_wrappers(model, build_wrappers(model, plan))


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `model` holds `old`: under every name, since one module can sit under
    several (T5's `shared` embedding is also `encoder.embed_tokens` and `decoder.embed_tokens`), and
    replacing one name only would leave the others running the old module silently."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, module in list(modules.items()):
        if module is old and name:
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name], child, new)


def place_wrappers(model: nn.Module, wrappers: Mapping[str, LayerWithLoRA]) -> list[str]:
    """Put wrappers from `build_wrappers` in place of the modules they wrap; their names."""
    modules = dict(model.named_modules())
    for name, wrapper in wrappers.items():
        parent = modules[name.rpartition(".")[0]]
        if isinstance(parent, nn.TransformerEncoderLayer):
            # Its inference fast path (eval, no grad) reads linear1/linear2.weight directly and
            # would skip the adapter; torch leaves that path when a submodule has forward hooks.
            wrapper.register_forward_pre_hook(_no_fast_path)
        replace_module(model, wrapper.base, wrapper)
        if wrapper.lora.magnitude is not None:
            # nn.TransformerEncoder turns a padded batch into a nested tensor in eval, and DoRA's
            # per-channel rescaling cannot take one: padded batches then run dense, as in training.
            for encoder in model.modules():
                if isinstance(encoder, nn.TransformerEncoder) and any(m is wrapper for m in encoder.modules()):
                    encoder.use_nested_tensor = False
    _enable_input_require_grads(model)
    return list(wrappers)


def build_wrappers(model: nn.Module, plan: Mapping[str, LoRASettings]) -> dict[str, LayerWithLoRA]:
    """The wrappers for the modules named in `plan`, built but not put in place. Each takes the
    train/eval mode of the module it wraps (a model in eval mode stays deterministic)."""
    _refuse_bypassed(model, plan)
    modules = dict(model.named_modules())
    wrappers = {}
    for name, s in plan.items():
        module = modules[name]
        kind = wrapper_class(module)
        try:
            if kind is None:
                raise TypeError(f"is {type(module).__name__}, a kind of layer LoRA does not wrap ({WRAPPED_KINDS})")
            wrapper = kind(module, s.rank, s.alpha, s.dropout, s.use_rslora, lora_bias=s.lora_bias, use_dora=s.use_dora)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{name}: {err}") from None
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
    The wrapped base layers are frozen; everything else keeps its `requires_grad` (see
    `mark_only_lora_trainable`). Returns the qualified names of the wrapped modules.
    """
    check_rank(rank)
    check_alpha(alpha)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: use one of {', '.join(INITS)}")
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    for key, value in rank_pattern.items():
        check_rank(value, f"rank_pattern[{key!r}]")
    for key, value in alpha_pattern.items():
        check_alpha(value, f"alpha_pattern[{key!r}]")
    names = find_targets(model, targets)
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
        _check_principal_init(model, names, init, too_wide)
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
    wrapped = wrap_modules(model, plan)
    if init != "kaiming":
        wrappers = dict(model.named_modules())
        for name in wrapped:
            start_adapter(wrappers[name], init)
    return wrapped


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


def _check_principal_init(model: nn.Module, names: list[str], init: str, too_wide) -> None:
    """PiSSA / OLoRA rewrite a float linear's own weight and need rank <= min(in, out): refuse the rest first."""
    modules = dict(model.named_modules())
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    bad = [f"{n} ({type(modules[n]).__name__})" for n in names if linear_shape(modules[n]) is None]
    bad += [f"{n} (quantized)" for n in names if quantization(modules[n]) is not None]
    bad += [f"{n} (weight shared, tied)" for n in names if owners[id(getattr(modules[n], "weight", None))] > 1]
    problems = [f"{init} starts linears with float weights (as PEFT), not {bad}"] if bad else []
    problems += [f"the rank is above the width of {sorted(too_wide)}"] if too_wide else []
    if problems:
        raise ValueError(f"init={init!r}: " + "; ".join(problems))


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float) -> list[str]:
    """The book's one-liner ("Build a Large Language Model (From Scratch)", appendix E): wrap
    every `nn.Linear`, the output head included. Note the scaling here is alpha / rank (as in the
    LoRA paper and PEFT) where the book multiplies by alpha alone."""
    return inject_lora(model, lambda _, m: isinstance(m, nn.Linear), rank, alpha)


def mark_only_lora_trainable(model: nn.Module, train: Iterable[str] = (), bias: str = "none") -> None:
    """Freeze every parameter but the LoRA ones (found by module type) and those of the modules
    named in `train` (same name matching as targets, e.g. a new classification head).

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
            child.requires_grad_(child_name != "base")
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
