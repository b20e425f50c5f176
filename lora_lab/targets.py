"""Which modules a LoRA target names: the selection `inject_lora` wraps.

A target matches a module whose qualified name equals it or ends with ``"." + target`` (so
``"W_query"``, ``"att.W_query"`` and ``"trf_blocks.0.att.W_query"`` all name that layer), as in
PEFT's `target_modules` list; ``"all-linear"`` takes every linear-like module but the output head;
a callable ``(name, module) -> bool`` decides by itself. Every name must match something and every
match must be a layer kind LoRA wraps, else the error lists the ones that are.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

from torch import nn

from .layers import wrapper_class
from .lora import LayerWithLoRA, linear_shape

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


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """ " (did you mean 'x'?)" for the choice closest to `word` (a typo, another case), else ""."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.75)
    close = close or [c for c in choices if c.lower() == word.lower()]
    return f" (did you mean {close[0]!r}?)" if close else ""


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


def find_targets(model: nn.Module, targets: Targets, adapter: str = "default") -> list[str]:
    """The qualified names that `targets` selects, in model order, checked: every name must match
    something, every match must be a layer kind LoRA wraps and hold no adapter named `adapter` yet.
    A callable target is shown a wrapped layer's base, the layer it adapts."""
    candidates = list(_candidates(model))
    if isinstance(targets, str) and targets == ALL_LINEAR:
        chosen = _all_linear(model, candidates)
    elif callable(targets):
        chosen = [(n, m) for n, m in candidates if targets(n, _layer(m))]
    else:
        chosen = _by_name(model, candidates, targets)
    if not chosen:
        raise ValueError(f"targets {targets!r} select no module; {_linear_names_summary(model)}")
    taken = [n for n, m in chosen if isinstance(m, LayerWithLoRA) and adapter in (m.adapter_name, *m.others)]
    if taken:
        raise ValueError(
            f"already hold a LoRA adapter named {adapter!r}: {taken}. Give this one another name "
            "(inject_lora(..., name='second'): several adapters live side by side), delete that adapter first "
            "(delete_adapter or unload_lora), or target only the modules that do not hold it."
        )
    not_wrappable = [f"{n} ({type(m).__name__})" for n, m in chosen if wrapper_class(_layer(m)) is None]
    if not_wrappable:
        raise ValueError(
            f"targets match modules that LoRA does not wrap: {not_wrappable}. lora_lab wraps {WRAPPED_KINDS}; "
            f"name those inside instead ({_linear_names_summary(model)})."
        )
    refuse_bypassed(model, [n for n, _ in chosen])
    return [n for n, _ in chosen]


def _layer(module: nn.Module) -> nn.Module:
    """The layer a module adapts: a wrapper's base, else the module itself."""
    return module.base if isinstance(module, LayerWithLoRA) else module


def refuse_bypassed(model: nn.Module, names: Iterable[str]) -> None:
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
        suffixes = {n.split(".", i)[-1] for n, m in candidates if _adaptable(m) for i in range(n.count(".") + 1)}
        raise ValueError(
            f"target(s) {unmatched} match no module of {type(model).__name__}"
            f"{did_you_mean(unmatched[0], suffixes)}; "
            f"{_linear_names_summary(model)}. Use a qualified name or a dotted suffix of one{example}, "
            f"a list of them, '{ALL_LINEAR}', or a callable (name, module) -> bool."
        )
    return [(n, m) for n, m in candidates if any(name_matches(n, k) for k in keys)]


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `model` holds `old`: under every name, since one module can sit under
    several (T5's `shared` embedding is also `encoder.embed_tokens` and `decoder.embed_tokens`), and
    replacing one name only would leave the others running the old module silently."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, module in list(modules.items()):
        if module is old and name:
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name], child, new)
