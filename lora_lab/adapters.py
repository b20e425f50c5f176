"""Adapters on disk: our own safetensors file, and Hugging Face PEFT's directory format.

Our format is one safetensors file holding only the adapter tensors (keys as in
`model.state_dict()`, e.g. ``trf_blocks.0.att.W_query.lora.A``) plus any extra modules asked for
(a trained classification head), with the LoRA settings as JSON in the file's metadata.

PEFT's format is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``
whose keys read ``base_model.model.<module>.lora_A.weight`` (A, rank x in) and ``...lora_B.weight``
(B, out x rank): the same tensors as ours under other names, so moving between the two is a
renaming plus a config.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .files import atomic_path, read_safetensors, write_text
from .inject import LoRASettings, fold_layer_names, name_matches, wrap_modules
from .lora import LinearWithLoRA, linear_shape, lora_modules

ADAPTER_FILE = "adapter.safetensors"
FORMAT_KEY, FORMAT_VERSION = "lora_lab", 1
PEFT_CONFIG, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
PEFT_PREFIX = "base_model.model."
_PEFT_LORA_KEY = re.compile(r"^(?P<name>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")

LoRATensors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A, B)
# torch.compile keeps the compiled module as `_orig_mod`; nn.DataParallel and DDP keep theirs as
# `module`. Adapters are saved without these, so they load into the plain model and the wrapped one.
_COMPILED = re.compile(r"(^|\.)_orig_mod(?=\.|$)")


def _plain_name(name: str, parallel: bool) -> str:
    """`name` without the prefixes that wrapping a model adds (`parallel`: the root is DP/DDP)."""
    name = _COMPILED.sub("", name).removeprefix(".")
    return name.removeprefix("module.") if parallel and name != "module" else name


def _plain_names(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """{plain name: name in `model`} for `names` (module names or state-dict keys of `model`)."""
    root = getattr(model, "_orig_mod", model)  # torch.compile(DDP(model)) is how DDP models are compiled
    parallel = isinstance(root, (nn.DataParallel, nn.parallel.DistributedDataParallel))
    return {_plain_name(n, parallel): n for n in names}


def _lora_modules(model: nn.Module) -> dict[str, LinearWithLoRA]:
    """The wrappers of `model` under their plain names."""
    wrappers = dict(lora_modules(model))
    return {plain: wrappers[n] for plain, n in _plain_names(model, wrappers).items()}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of `model` (A and B of every wrapper), keyed as in `model.state_dict()`."""
    return {
        f"{name}.lora.{key}": tensor
        for name, wrapper in lora_modules(model)
        for key, tensor in wrapper.lora.state_dict().items()
    }


def _settings(wrapper: LinearWithLoRA) -> LoRASettings:
    lora = wrapper.lora
    p = lora.dropout.p if lora.dropout is not None else 0.0
    return LoRASettings(lora.rank, lora.alpha, p, lora.use_rslora)


def _wrappers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    wrappers = _lora_modules(model)
    if not wrappers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to save: call inject_lora(model, ...) first")
    return wrappers


def _extra_state(model: nn.Module, extra: Iterable[str]) -> dict[str, torch.Tensor]:
    """State-dict entries of the modules named in `extra` (same name matching as targets), under
    plain names. A tensor tied to one outside them (a head shared with the input embedding) is
    saved under every name it has, so loading restores both wherever the model keeps them."""
    keys = [extra] if isinstance(extra, str) else list(extra)
    if not keys:
        return {}
    modules = _plain_names(model, (n for n, _ in model.named_modules()))
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
    plain_state = _plain_names(model, state)
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


def _warn_left_out(model: nn.Module, saved: Iterable[str], call: str) -> None:
    """Warn when trainable parameters that are neither LoRA nor saved would be lost (a trained
    head the user forgot to pass as `extra`)."""
    saved = set(saved)
    params = _plain_names(model, (n for n, p in model.named_parameters() if p.requires_grad))
    left = sorted({n.rsplit(".", 1)[0] for n in params if ".lora." not in n and n not in saved})
    if left:
        shown = fold_layer_names(left)
        warnings.warn(
            f"{call} leaves out the trainable parameters of {len(left)} module(s) that are not LoRA "
            f"({', '.join(shown[:8])}{', ...' if len(shown) > 8 else ''}), so the adapter will not hold them. "
            "Pass them as extra=[...] to keep them (a new head, say), or call mark_only_lora_trainable(model) "
            "if they were not meant to train.",
            stacklevel=3,
        )


def _save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict) -> None:
    # safetensors wants contiguous CPU tensors that share no storage.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, tmp, metadata=metadata)


def _adapter_file(path: str | os.PathLike) -> Path:
    """The file itself, if `path` names a ``.safetensors`` file or an existing file; otherwise
    `path` is a directory (made if need be) that holds ``adapter.safetensors``."""
    file = Path(path)
    if file.is_file() or (file.suffix == ".safetensors" and not os.fspath(path).endswith(("/", os.sep))):
        return file
    return file / ADAPTER_FILE


def save_adapter(model: nn.Module, path: str | os.PathLike, extra: Iterable[str] = ()) -> Path:
    """Write the adapter of `model` (and the modules named in `extra`) to one safetensors file,
    atomically. `path` is the file, or a directory to hold ``adapter.safetensors``."""
    wrappers = _wrappers(model)
    tensors = {f"{n}.lora.{k}": t for n, w in wrappers.items() for k, t in w.lora.state_dict().items()}
    tensors.update(_extra_state(model, extra))
    _warn_left_out(model, tensors, "save_adapter")
    info = {
        "version": FORMAT_VERSION,
        "modules": {
            name: {"in_features": w.in_features, "out_features": w.out_features, **vars(_settings(w))}
            for name, w in wrappers.items()
        },
        "extra": sorted(k for k in tensors if ".lora." not in k),
    }
    path = _adapter_file(path)
    _save_safetensors(path, tensors, {"format": "pt", FORMAT_KEY: json.dumps(info)})
    return path


def load_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load an adapter written by `save_adapter` into `model`, wrapping the modules it names if
    they are not wrapped yet. Names, shapes and settings are checked first and every mismatch is
    reported; the model is changed only if all fit. Returns the wrapped module names."""
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
        modules = info["modules"]
        plan = {n: LoRASettings(m["rank"], m["alpha"], m["dropout"], m["use_rslora"]) for n, m in modules.items()}
        lora = {n: (tensors.pop(f"{n}.lora.A"), tensors.pop(f"{n}.lora.B")) for n in plan}
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: adapter settings or tensors are incomplete ({err!r})") from err
    return _apply(model, plan, lora, tensors, str(path))


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


def _apply(
    model: nn.Module,
    plan: Mapping[str, LoRASettings],
    lora: LoRATensors,
    extra: Mapping[str, torch.Tensor],
    source: str,
) -> list[str]:
    """Check an adapter against `model`, then wrap what is missing and copy the tensors in.

    Names are plain (no `_orig_mod.` / `module.` from torch.compile or DDP). Tensors in `extra`
    replace the model's; one that the model shares between two names (a tied head) is untied
    first, so only the name the adapter gives changes (PEFT's `modules_to_save` keep their own
    copy too). Merged wrappers are unmerged for the copy and merged again with the new update.
    """
    problems, to_wrap = _check_modules(model, plan, lora)
    state = model.state_dict()
    keys = _plain_names(model, state)
    for key, tensor in extra.items():
        if key not in keys:
            problems.append(f"{key}: the adapter holds this tensor, the model has no such entry")
        elif (have := tuple(state[keys[key]].shape)) != tuple(tensor.shape):
            problems.append(f"{key}: {tuple(tensor.shape)} in the adapter, {have} in the model")
    if problems:
        raise ValueError(
            f"adapter {source} does not fit this {type(model).__name__} (was it trained on a "
            "model of another size or architecture?):\n  - " + "\n  - ".join(problems)
        )
    wrap_modules(model, to_wrap)
    wrappers = _lora_modules(model)
    merged = [w for w in wrappers.values() if w.merged]
    with torch.no_grad():
        for w in merged:
            w.unmerge()
        for name, (a, b) in lora.items():
            wrappers[name].lora.A.copy_(a)
            wrappers[name].lora.B.copy_(b)
    if extra:
        _untie(model, (keys[k] for k in extra))
        model.load_state_dict({keys[k]: v for k, v in extra.items()}, strict=False)
    for w in merged:
        w.merge()
    return list(plan)


def _check_modules(
    model: nn.Module, plan: Mapping[str, LoRASettings], lora: LoRATensors
) -> tuple[list[str], dict[str, LoRASettings]]:
    """What does not fit between the adapter's modules and the model's (every problem, not the
    first), and the modules still to wrap, by their names in the model."""
    modules = _plain_names(model, (n for n, _ in model.named_modules()))
    named = dict(model.named_modules())
    problems: list[str] = []
    to_wrap: dict[str, LoRASettings] = {}
    for name, s in plan.items():
        module = named.get(modules.get(name, "\0"))
        if module is None:
            problems.append(f"{name}: the model has no such module")
            continue
        if isinstance(module, LinearWithLoRA):
            have = _settings(module)
            if (have.rank, have.alpha, have.use_rslora) != (s.rank, s.alpha, s.use_rslora):
                problems.append(
                    f"{name}: wrapped with rank={have.rank}, alpha={have.alpha}, "
                    f"rslora={have.use_rslora}; the adapter has rank={s.rank}, alpha={s.alpha}, "
                    f"rslora={s.use_rslora}"
                )
            shape = (module.in_features, module.out_features)
            if module.merged and not all(torch.isfinite(t).all() for t in lora[name]):
                problems.append(f"{name}: is merged, and the adapter's update has NaN or inf entries")
        else:
            shape = linear_shape(module)
            if shape is None:
                problems.append(f"{name}: is {type(module).__name__}, not a linear layer")
                continue
            to_wrap[modules[name]] = s
        (n_in, n_out), (a, b) = shape, lora[name]
        want_a, want_b = (s.rank, n_in), (n_out, s.rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(
                f"{name}: the adapter's A is {tuple(a.shape)} and B {tuple(b.shape)}, the model's "
                f"layer ({n_in} in, {n_out} out) needs A {want_a} and B {want_b}"
            )
    for name in _lora_modules(model):
        if name not in plan:
            problems.append(f"{name}: LoRA-wrapped in the model, but the adapter has no weights for it")
    return problems, to_wrap


def _most_common(values: Iterable) -> object:
    return Counter(values).most_common(1)[0][0]


def export_peft_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    extra: Iterable[str] = (),
) -> Path:
    """Write the adapter in PEFT's format, loadable with ``PeftModel.from_pretrained(base, dir)``.

    The most common rank / alpha become `r` / `lora_alpha`, the others go to `rank_pattern` /
    `alpha_pattern` under full module names; `extra` modules become PEFT's `modules_to_save`.
    """
    wrappers = _wrappers(model)
    settings = {n: _settings(w) for n, w in wrappers.items()}
    rslora = {s.use_rslora for s in settings.values()}
    if len(rslora) > 1:
        raise ValueError("PEFT's format has one use_rslora for all layers; this model mixes both")
    r = _most_common(s.rank for s in settings.values())
    alpha = _most_common(s.alpha for s in settings.values())
    # PEFT matches target and pattern keys as suffixes ("proj" also matches "block.proj"): a name
    # that is the suffix of another module's gets an anchored regex, so it matches itself alone.
    names = list(_plain_names(model, (n for n, _ in model.named_modules())))
    clashes = {n for n in settings if any(o.endswith("." + n) for o in names)}

    def key(name: str) -> str:
        return f"^{re.escape(name)}$" if name in clashes else name

    extra_tensors = _extra_state(model, extra)
    _warn_left_out(model, extra_tensors, "export_peft_adapter")
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common(s.dropout for s in settings.values()),
        # a list is matched by suffix, a string as one regex over full names
        "target_modules": "|".join(map(re.escape, sorted(settings))) if clashes else sorted(settings),
        "rank_pattern": {key(n): s.rank for n, s in settings.items() if s.rank != r},
        "alpha_pattern": {key(n): s.alpha for n, s in settings.items() if s.alpha != alpha},
        "use_rslora": rslora.pop(),
        # PEFT's flag for weights stored (in, out), as transformers' Conv1D does.
        "fan_in_fan_out": any(not isinstance(w.base, nn.Linear) for w in wrappers.values()),
        "bias": "none",
        "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in extra_tensors}) or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {PEFT_PREFIX + k: v for k, v in extra_tensors.items()}
    for name, w in wrappers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = w.lora.A
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = w.lora.B
    directory = Path(directory)
    _save_safetensors(directory / PEFT_WEIGHTS, tensors, {"format": "pt"})
    write_text(directory / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")
    return directory


def _peft_pattern_value(pattern: Mapping[str, float], name: str, default: float) -> float:
    # PEFT's rule (peft.utils.other.get_pattern_key): the first key, read as a regex, that
    # matches the end of the module name at a dot boundary.
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default


def _read_peft_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / PEFT_WEIGHTS).is_file():
        return read_safetensors(directory / PEFT_WEIGHTS, "save the adapter again")[0]
    if (directory / PEFT_WEIGHTS_BIN).is_file():
        return torch.load(directory / PEFT_WEIGHTS_BIN, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{directory} has {PEFT_CONFIG} but no {PEFT_WEIGHTS} (or {PEFT_WEIGHTS_BIN}); "
        "copy the adapter's weight file next to its config"
    )


# What lora_lab reads from a PEFT LoraConfig: every other setting must be off (None, False, empty,
# "none"), since it would change the math (DoRA, biases, aLoRA, a rebuilt base...) or the layers.
_PEFT_KEYS_READ = {
    # bookkeeping
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "runtime_config", "megatron_core", "qalora_group_size",
    # which layers: the tensors in the file say it
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    # the math we implement
    "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
    "modules_to_save", "init_lora_weights",
}  # fmt: skip
# Initialisations that only set A and B (which the file replaces). PiSSA, OLoRA, CorDA, LoftQ and
# LoRA-GA also rewrite the base weights, so the adapter only fits PEFT's rebuilt base.
_PEFT_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


def _check_peft_config(config: Mapping[str, object], source: Path) -> None:
    """Refuse a PEFT config that asks for anything but plain LoRA, naming every such key."""
    bad = {k: v for k, v in config.items() if k not in _PEFT_KEYS_READ and v not in (None, False, "none", {}, [])}
    if config.get("peft_type") != "LORA":
        bad["peft_type"] = config.get("peft_type")
    if config.get("init_lora_weights", True) not in _PEFT_PLAIN_INITS:
        bad["init_lora_weights"] = config["init_lora_weights"]
    if bad:
        raise ValueError(
            f"{source}: lora_lab imports plain LoRA adapters (peft_type LORA; r, lora_alpha, rsLoRA, rank and alpha "
            f"patterns, modules_to_save), and this one sets {bad}, which would change what the adapter computes. "
            "Load it with PEFT itself (PeftModel.from_pretrained), or, for PiSSA/OLoRA adapters, save them from "
            "PEFT converted to plain LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...))."
        )


def import_peft_adapter(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Load a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
    into `model`, wrapping the modules it names. Returns the wrapped module names."""
    directory = Path(directory)
    config_file = directory / PEFT_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no {PEFT_CONFIG} in {directory}: a PEFT adapter directory holds {PEFT_CONFIG} and "
            f"{PEFT_WEIGHTS} (PeftModel.save_pretrained or export_peft_adapter write them)"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON (corrupt?): {err}") from err
    _check_peft_config(config, config_file)
    r, alpha = config["r"], config["lora_alpha"]
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    plain_state = _plain_names(model, state)
    for key, tensor in _read_peft_weights(directory).items():
        key = key.removeprefix(PEFT_PREFIX)
        if ".base_layer." in key:
            # PEFT saves the base weights of targeted embedding layers and heads too
            # (save_embedding_layers="auto"): fine when they are the model's own.
            plain = key.replace(".base_layer.", ".")
            wrapped = key.replace(".base_layer.", ".base.")  # where it lives once we wrapped the layer
            have = state.get(plain_state.get(plain) or plain_state.get(wrapped, ""))
            if have is None or have.shape != tensor.shape or not torch.equal(have.to(tensor.dtype), tensor):
                raise ValueError(
                    f"{directory}: the adapter carries its own base weight {key}, which differs from the model's "
                    f"{plain} (a resized vocabulary?). lora_lab adapters never change base weights: resize the "
                    "model as it was for training first, or load the adapter with PEFT itself"
                )
            continue
        match = _PEFT_LORA_KEY.match(key)
        if match:
            parts.setdefault(match["name"], {})[match["ab"]] = tensor
        elif "lora_" in key:
            raise ValueError(f"{directory}: unsupported LoRA tensor {key} (embedding or DoRA?)")
        else:
            extra[key] = tensor  # modules_to_save, e.g. a classification head
    problems = [f"{n}: has only lora_{next(iter(p))}" for n, p in parts.items() if len(p) != 2]
    plan: dict[str, LoRASettings] = {}
    for name, p in parts.items():
        rank = p["A"].shape[0] if "A" in p else 0
        expected = _peft_pattern_value(rank_pattern, name, r)
        if rank != expected:
            problems.append(f"{name}: lora_A has rank {rank}, the config says {expected}")
        plan[name] = LoRASettings(
            rank,
            _peft_pattern_value(alpha_pattern, name, alpha),
            config.get("lora_dropout", 0.0),
            bool(config.get("use_rslora", False)),
        )
    if problems:
        raise ValueError(f"{directory}: inconsistent PEFT adapter:\n  - " + "\n  - ".join(problems))
    return _apply(model, plan, {n: (p["A"], p["B"]) for n, p in parts.items()}, extra, str(directory))
