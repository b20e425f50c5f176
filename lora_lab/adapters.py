"""Adapters on disk in lora_lab's own format, and what every format needs to put one into a model.

Our format is one safetensors file holding only the adapter tensors (keys as in
`model.state_dict()`, e.g. ``trf_blocks.0.att.W_query.lora.A``) plus any extra modules asked for
(a trained classification head), with the LoRA settings as JSON in the file's metadata.
`apply_adapter` checks an adapter against a model (every mismatch listed at once), wraps what is
missing and copies the tensors in; PEFT's directory format (`peft_format.py`) goes through it too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .files import read_safetensors, save_safetensors
from .inject import LoRASettings, build_wrappers, place_wrappers
from .lora import LayerWithLoRA, LoRALayer, lora_modules
from .named_adapters import (
    DEFAULT_ADAPTER,
    active_adapter,
    adapter_layer,
    adapter_names,
    check_adapter_name,
    check_held,
    holds,
    refuse_beside_principal,
)
from .targets import fold_layer_names, name_matches
from .variants import converted

ADAPTER_FILE = "adapter.safetensors"
FORMAT_KEY, FORMAT_VERSION = "lora_lab", 2  # 2: layer kinds, DoRA, LoRA and trained biases

LoRATensors = dict[str, dict[str, torch.Tensor]]  # module name -> {"lora.A": A, "lora.B": B, ...}
# torch.compile keeps the compiled module as `_orig_mod`; nn.DataParallel and DDP keep theirs as
# `module`. Adapters are saved without these, so they load into the plain model and the wrapped one.
_COMPILED = re.compile(r"(^|\.)_orig_mod(?=\.|$)")


def _plain_name(name: str, parallel: bool) -> str:
    """`name` without the prefixes that wrapping a model adds (`parallel`: the root is DP/DDP)."""
    name = _COMPILED.sub("", name).removeprefix(".")
    return name.removeprefix("module.") if parallel and name != "module" else name


def plain_names(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """{plain name: name in `model`} for `names` (module names or state-dict keys of `model`)."""
    root = getattr(model, "_orig_mod", model)  # torch.compile(DDP(model)) is how DDP models are compiled
    parallel = isinstance(root, (nn.DataParallel, nn.parallel.DistributedDataParallel))
    return {_plain_name(n, parallel): n for n in names}


def _lora_modules(model: nn.Module) -> dict[str, LayerWithLoRA]:
    """The wrappers of `model` under their plain names."""
    wrappers = dict(lora_modules(model))
    return {plain: wrappers[n] for plain, n in plain_names(model, wrappers).items()}


def adapter_tensors(wrapper: LayerWithLoRA, name: str | None = None) -> dict[str, torch.Tensor]:
    """What adapter `name` of a wrapper (default: the one in use) adds to its base, under the names
    it has in the wrapper when it runs: ``lora.A``, ``lora.B``, and ``lora.bias``, ``lora.magnitude``,
    attention's ``out_lora.*`` where they exist."""
    if name is None or name == wrapper.adapter_name:
        return {k: v for k, v in wrapper.state_dict(keep_vars=True).items() if not k.startswith(("base.", "others."))}
    return {f"lora.{k}": v for k, v in wrapper.others[name].state_dict(keep_vars=True).items()}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of `model` (A and B of every wrapper and adapter, and what a variant adds),
    keyed as in `model.state_dict()`."""
    return {
        f"{n}.{k}": t.detach() for n, w in lora_modules(model) for k, t in w.state_dict().items() if k[:5] != "base."
    }


def saved_adapter(wrapper: LayerWithLoRA, name: str | None = None) -> tuple[LoRASettings, dict[str, torch.Tensor]]:
    """(settings, tensors) of adapter `name` (default: the one in use) as an adapter file holds them:
    as they are, or for an adapter started by PiSSA / OLoRA over a residual base, converted to a
    rank-2r LoRA over the original base (the scaling kept: alpha doubled, or times sqrt 2 with
    rsLoRA), so it loads into a fresh model."""
    lora = adapter_layer(wrapper, name)
    settings = lora_settings(lora)
    tensors = {k: t.detach() for k, t in adapter_tensors(wrapper, name).items()}
    if getattr(lora, "A0", None) is None:
        return settings, tensors
    tensors["lora.A"], tensors["lora.B"] = converted(tensors["lora.A"], tensors["lora.B"], lora.A0, lora.B0)
    alpha = settings.alpha * (math.sqrt(2) if settings.use_rslora else 2)
    return dataclasses.replace(settings, rank=2 * settings.rank, alpha=alpha), tensors


def lora_settings(lora: LoRALayer) -> LoRASettings:
    p = lora.dropout.p if lora.dropout is not None else 0.0
    return LoRASettings(lora.rank, lora.alpha, p, lora.use_rslora, lora.magnitude is not None, lora.bias is not None)


def trained_biases(
    model: nn.Module, saved: Iterable[str] = (), wrappers: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """The base biases that train beside LoRA (`mark_only_lora_trainable(model, bias="lora_only"
    or "all")`, as PEFT's `bias`), under plain names (a wrapped layer's as ``<layer>.base.bias``),
    as they are without a merged LoRA bias: when every trainable parameter but LoRA's and those
    `saved` is a bias, else none. With `wrappers` (one adapter's layers), not the biases of wrapped
    layers outside them: those go with the other adapters, as in PEFT."""
    adapters = set(lora_state_dict(model))
    params = {k: p for k, p in model.named_parameters() if p.requires_grad and k not in adapters}
    plain = {p: k for p, k in plain_names(model, params).items() if p not in set(saved)}
    if not plain or any(p.rsplit(".", 1)[-1] != "bias" for p in plain):
        return {}
    layers = _lora_modules(model)
    merged = {f"{n}.base.bias": w.lora for n, w in layers.items() if w.merged and w.lora.bias is not None}
    others = {f"{n}.base.bias" for n in layers if wrappers is not None and n not in set(wrappers)}
    out = {}
    for p, k in plain.items():
        if p in others:
            continue
        bias = params[k].detach()
        out[p] = bias - (merged[p].bias * merged[p].scaling).to(bias.dtype) if p in merged else bias
    return out


def wrappers_by_name(model: nn.Module, name: str | None = None) -> dict[str, LayerWithLoRA]:
    """The wrappers that hold adapter `name` (default: the active one), under their plain names."""
    wrappers = _lora_modules(model)
    if not wrappers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to save: call inject_lora(model, ...) first")
    name = name or active_adapter(model)
    check_held(model, name)
    return {n: w for n, w in wrappers.items() if holds(w, name)}


def extra_state(model: nn.Module, extra: Iterable[str]) -> dict[str, torch.Tensor]:
    """State-dict entries of the modules named in `extra` (same name matching as targets), under
    plain names. A tensor tied to one outside them (a head shared with the input embedding) is
    saved under every name it has, so loading restores both wherever the model keeps them."""
    keys = [extra] if isinstance(extra, str) else list(extra)
    if not keys:
        return {}
    modules = plain_names(model, (n for n, _ in model.named_modules()))
    wrapped = list(_lora_modules(model))
    chosen: list[str] = []
    for key in keys:
        names = [n for n in modules if n and name_matches(n, key)]
        if not names:
            top = [n for n, _ in model.named_children()]
            raise ValueError(f"extra={key!r} matches no module of {type(model).__name__}; its top-level modules: {top}")
        for name in names:
            if any(name_matches(name, w) or name.startswith(w + ".") for w in wrapped):
                raise ValueError(
                    f"extra={key!r} names {name}, which is LoRA-wrapped: its adapter is saved "
                    "anyway, and its frozen base belongs to the base model, not the adapter"
                )
            inside = [w for w in wrapped if w.startswith(name + ".")]
            if inside:
                raise ValueError(
                    f"extra={key!r} names {name}, which holds LoRA-wrapped layers {inside}: a module is "
                    "either adapted by LoRA or saved whole, not both. Leave its layers out of the LoRA "
                    f"targets and keep extra={key!r}, or name only its unwrapped parts in extra"
                )
            chosen.append(name)
    state = model.state_dict(keep_vars=True)
    plain_state = plain_names(model, state)
    owners: dict[int, list[str]] = {}
    for plain, key in plain_state.items():
        owners.setdefault(id(state[key]), []).append(plain)
    out: dict[str, torch.Tensor] = {}
    for plain, key in plain_state.items():
        if any(plain.startswith(name + ".") for name in chosen):
            for owner in owners[id(state[key])]:
                inside = [w for w in wrapped if owner.startswith(w + ".")]
                if inside:
                    raise ValueError(
                        f"{plain} is tied to {owner}, the frozen base of the LoRA-wrapped {inside[0]}: an adapter "
                        f"cannot carry a base weight, so a trained {plain} would not reach {inside[0]} when loaded. "
                        f"Leave {inside[0]} out of the LoRA targets, or untie the two before training"
                    )
                out[owner] = state[key].detach()
    return out


def warn_left_out(model: nn.Module, saved: Iterable[str], call: str) -> None:
    """Warn when trainable parameters that are neither LoRA nor saved would be lost (a trained
    head the user forgot to pass as `extra`)."""
    saved = set(saved)
    params = plain_names(model, (n for n, p in model.named_parameters() if p.requires_grad))
    adapters = set(plain_names(model, lora_state_dict(model)))
    left = sorted({n.rsplit(".", 1)[0] for n in params if n not in adapters and n not in saved})
    if left:
        shown = fold_layer_names(left)
        warnings.warn(
            f"{call} leaves out the trainable parameters of {len(left)} module(s) that are not LoRA "
            f"({', '.join(shown[:8])}{', ...' if len(shown) > 8 else ''}), so the adapter will not hold them. "
            "Pass them as extra=[...] to keep them (a new head, say), or call mark_only_lora_trainable(model) "
            "if they were not meant to train.",
            stacklevel=3,
        )


def _adapter_file(path: str | os.PathLike) -> Path:
    """The file itself, if `path` names a ``.safetensors`` file or an existing file; otherwise
    `path` is a directory (made if need be) that holds ``adapter.safetensors``."""
    file = Path(path)
    if file.is_file() or (file.suffix == ".safetensors" and not os.fspath(path).endswith(("/", os.sep))):
        return file
    return file / ADAPTER_FILE


def save_adapter(model: nn.Module, path: str | os.PathLike, extra: Iterable[str] = (), name: str | None = None) -> Path:
    """Write adapter `name` of `model` (default: the active one) and the modules named in `extra` to
    one safetensors file, atomically. `path` is the file, or a directory to hold ``adapter.safetensors``."""
    wrappers = wrappers_by_name(model, name)
    saved = {n: saved_adapter(w, name) for n, w in wrappers.items()}
    tensors = {f"{n}.{k}": t for n, (_, ts) in saved.items() for k, t in ts.items()}
    extras = extra_state(model, extra)
    extras.update(trained_biases(model, extras, wrappers))
    tensors.update(extras)
    warn_left_out(model, tensors, "save_adapter")
    plain = all(
        type(w).__name__ == "LinearWithLoRA" and not s.lora_bias and not s.use_dora
        for w, (s, _) in zip(wrappers.values(), saved.values(), strict=True)
    )
    info = {
        "version": 1 if plain else FORMAT_VERSION,  # what plain LoRA on linears writes is what version 1 read
        "modules": {
            name: {
                "kind": type(w).__name__,
                "in_features": w.in_features,
                "out_features": w.out_features,
                **vars(saved[name][0]),
            }
            for name, w in wrappers.items()
        },
        "extra": sorted(extras),
    }
    path = _adapter_file(path)
    save_safetensors(path, tensors, {"format": "pt", FORMAT_KEY: json.dumps(info)})
    return path


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> list[str]:
    """Load an adapter written by `save_adapter` into `model` as adapter `name` (default: the one the
    model runs, or "default" in a model without one), wrapping the modules it names if they are not
    wrapped yet; a new name joins the model's adapters, waiting (`named_adapters.set_adapter`). Names,
    shapes and settings are checked first and every mismatch is reported; the model is changed only if
    all fit. Returns the wrapped module names."""
    path = _adapter_file(path)
    tensors, metadata = read_safetensors(path, "save one with save_adapter(model, path)")
    if FORMAT_KEY not in metadata:
        hint = (
            " It looks like a PEFT adapter: use import_peft_adapter(model, directory)."
            if any(".lora_A." in k for k in tensors)
            else ""
        )
        raise ValueError(f"{path} holds no lora_lab adapter settings in its metadata.{hint}")
    try:
        info = json.loads(metadata[FORMAT_KEY])
        version = info["version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{path} is lora_lab adapter format {version!r}; this lora_lab reads format {FORMAT_VERSION} "
                "and older: upgrade lora_lab (pip install -U lora-lab)"
            )
        fields = ("rank", "alpha", "dropout", "use_rslora", "use_dora", "lora_bias")
        plan = {n: LoRASettings(*(m[f] for f in fields if f in m)) for n, m in info["modules"].items()}
        extra = {k: tensors.pop(k) for k in info.get("extra", [])}
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: adapter settings or tensors are incomplete ({err!r})") from err
    lora: LoRATensors = {n: {} for n in plan}
    for key, tensor in tensors.items():
        owner = max((n for n in plan if key.startswith(n + ".")), key=len, default=None)
        if owner is None:
            extra[key] = tensor  # an extra tensor from a file that does not list them
        else:
            lora[owner][key[len(owner) + 1 :]] = tensor
    return apply_adapter(model, plan, lora, extra, str(path), name)


def _untie(model: nn.Module, keys: Iterable[str]) -> None:
    """Give each parameter named in `keys` (state-dict keys of `model`) that is shared with another
    name its own copy, so loading it changes that one place only."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for key in keys:
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        param = module._parameters.get(attr)
        if param is not None and counts[id(param)] > 1:
            setattr(module, attr, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))


def apply_adapter(
    model: nn.Module,
    plan: Mapping[str, LoRASettings],
    lora: LoRATensors,
    extra: Mapping[str, torch.Tensor],
    source: str,
    name: str | None = None,
) -> list[str]:
    """Check an adapter against `model`, then wrap what is missing and copy the tensors in, as
    adapter `name` (default: the one the model runs, else "default"; a new name joins, waiting).

    Names are plain (no `_orig_mod.` / `module.` from torch.compile or DDP); `lora` holds each
    module's adapter tensors under their names in the wrapper (``lora.A``...). Tensors in `extra`
    replace the model's; a wrapped layer's trained bias is named ``<layer>.base.bias``. One that
    the model shares between two names (a tied head) is untied first, so only the name the adapter
    gives changes (PEFT's `modules_to_save` keep their own copy too). Merged wrappers are unmerged
    for the copy and merged again with the new update. Nothing changes unless everything fits.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    name = _adapter_name(model, name, extra, source)
    problems, built = _check_modules(model, plan, lora, name)
    state = model.state_dict()
    keys = plain_names(model, state)
    wrapping = [n for n in plan if n not in _lora_modules(model)]
    for key, tensor in extra.items():
        before = next((key.replace(f"{n}.base.", f"{n}.", 1) for n in wrapping if key.startswith(f"{n}.base.")), key)
        if before not in keys:
            problems.append(f"{key}: the adapter holds this tensor, the model has no such entry")
        elif (have := tuple(state[keys[before]].shape)) != tuple(tensor.shape):
            problems.append(f"{key}: {tuple(tensor.shape)} in the adapter, {have} in the model")
    if problems:
        for param, flag in flags:  # building the wrappers froze their bases: undo that
            param.requires_grad_(flag)
        raise ValueError(
            f"adapter {source} does not fit this {type(model).__name__} (was it trained on a "
            "model of another size or architecture?):\n  - " + "\n  - ".join(problems)
        )
    place_wrappers(model, built)
    wrappers = _lora_modules(model)
    merged = [w for w in wrappers.values() if w.merged]
    with torch.no_grad():
        for w in merged:
            w.unmerge()
        for module, tensors in lora.items():
            have = adapter_tensors(wrappers[module], name)
            for key, tensor in tensors.items():
                have[key].copy_(tensor)
    if extra:
        keys = plain_names(model, model.state_dict())
        _untie(model, (keys[k] for k in extra))
        model.load_state_dict({keys[k]: v for k, v in extra.items()}, strict=False)
    for w in merged:
        w.merge()
    return list(plan)


def _adapter_name(model: nn.Module, name: str | None, extra: Mapping[str, torch.Tensor], source: str) -> str:
    """The name to load an adapter as (default: the one the model runs, else "default"), checked."""
    name = check_adapter_name(name or active_adapter(model) or DEFAULT_ADAPTER)
    refuse_beside_principal(model, name)
    others = [n for n in adapter_names(model) if n != name]
    if extra and others:
        raise ValueError(
            f"adapter {source} carries whole modules ({sorted(extra)[:3]}...: a head, PEFT's modules_to_save), and "
            f"the model holds other adapters {others}: lora_lab keeps one copy of such a module, not one per "
            "adapter as PEFT does, so loading it would change what the others run. Load it into a model without "
            "other adapters"
        )
    return name


def _check_modules(
    model: nn.Module, plan: Mapping[str, LoRASettings], lora: LoRATensors, adapter: str
) -> tuple[list[str], dict[str, LayerWithLoRA]]:
    """What does not fit between the adapter's modules and the model's (every problem, not the
    first), and the wrappers built for the modules that do not hold adapter `adapter` yet, by their
    names in the model."""
    modules = plain_names(model, (n for n, _ in model.named_modules()))
    named = dict(model.named_modules())
    problems: list[str] = []
    to_wrap: dict[str, LoRASettings] = {}
    for name, s in plan.items():
        module = named.get(modules.get(name, "\0"))
        if module is None:
            problems.append(f"{name}: the model has no such module")
        elif isinstance(module, LayerWithLoRA) and holds(module, adapter):
            have = lora_settings(adapter_layer(module, adapter))
            if getattr(adapter_layer(module, adapter), "A0", None) is not None:
                problems.append(
                    f"{name}: was started by PiSSA / OLoRA, so its base holds the residual W - scaling B0 A0, not W; "
                    "load adapters into a model wrapped with the plain init, or into one not wrapped yet"
                )
            if vars(have) | {"dropout": 0} != vars(s) | {"dropout": 0}:
                problems.append(f"{name}: wrapped with {_settings_text(have)}; the adapter has {_settings_text(s)}")
            if (
                module.merged
                and module.adapter_name == adapter
                and not all(torch.isfinite(t).all() for t in lora[name].values())
            ):
                problems.append(f"{name}: is merged, and the adapter's update has NaN or inf entries")
        else:
            to_wrap[modules[name]] = s
    built: dict[str, LayerWithLoRA] = {}
    try:
        built = build_wrappers(model, to_wrap, adapter)
    except (ValueError, TypeError) as err:
        problems.append(str(err))
    for name in plan:
        wrapper = built.get(modules.get(name, "\0")) or named.get(modules.get(name, "\0"))
        if isinstance(wrapper, LayerWithLoRA) and holds(wrapper, adapter):
            want = {k: tuple(t.shape) for k, t in adapter_tensors(wrapper, adapter).items()}
            got = {k: tuple(t.shape) for k, t in lora[name].items()}
            for key in sorted(want.keys() | got.keys()):
                if want.get(key) != got.get(key):
                    problems.append(
                        f"{name}: the adapter's {key} is {got.get(key, 'missing')}, the model's "
                        f"{type(wrapper.base).__name__} needs {want.get(key, 'none')}"
                    )
    for name, wrapper in _lora_modules(model).items():
        if name not in plan and holds(wrapper, adapter):
            problems.append(f"{name}: LoRA-wrapped in the model, but the adapter has no weights for it")
    return problems, built


def _settings_text(s: LoRASettings) -> str:
    return f"rank={s.rank}, alpha={s.alpha}, rslora={s.use_rslora}, dora={s.use_dora}, lora_bias={s.lora_bias}"
