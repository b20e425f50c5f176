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
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .files import atomic_path, read_safetensors, write_text
from .inject import LoRASettings, name_matches, wrap_modules
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
    wrappers = dict(lora_modules(model))
    if not wrappers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to save: call inject_lora(model, ...) first")
    return wrappers


def _extra_state(model: nn.Module, extra: Iterable[str]) -> dict[str, torch.Tensor]:
    """State-dict entries of the modules named in `extra` (same name matching as targets)."""
    keys = [extra] if isinstance(extra, str) else list(extra)
    state = model.state_dict()
    wrapped = [n for n, _ in lora_modules(model)]
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        names = [n for n, _ in model.named_modules() if n and name_matches(n, key)]
        if not names:
            raise ValueError(f"extra={key!r} matches no module of {type(model).__name__}")
        for name in names:
            if any(name_matches(name, w) or name.startswith(w + ".") for w in wrapped):
                raise ValueError(
                    f"extra={key!r} names {name}, which is LoRA-wrapped: its adapter is saved "
                    "anyway, and its frozen base belongs to the base model, not the adapter"
                )
            out.update({k: v for k, v in state.items() if k.startswith(name + ".")})
    return out


def _save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict) -> None:
    # safetensors wants contiguous CPU tensors that share no storage.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, tmp, metadata=metadata)


def _adapter_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / ADAPTER_FILE if path.is_dir() else path


def save_adapter(model: nn.Module, path: str | os.PathLike, extra: Iterable[str] = ()) -> Path:
    """Write the adapter of `model` (and the modules named in `extra`) to one safetensors file,
    atomically. `path` is the file, or a directory to hold ``adapter.safetensors``."""
    wrappers = _wrappers(model)
    tensors = {**lora_state_dict(model), **_extra_state(model, extra)}
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
        modules = info["modules"]
        plan = {n: LoRASettings(m["rank"], m["alpha"], m["dropout"], m["use_rslora"]) for n, m in modules.items()}
        lora = {n: (tensors.pop(f"{n}.lora.A"), tensors.pop(f"{n}.lora.B")) for n in plan}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: adapter settings or tensors are incomplete ({err!r})") from err
    return _apply(model, plan, lora, tensors, str(path))


def _apply(
    model: nn.Module,
    plan: Mapping[str, LoRASettings],
    lora: LoRATensors,
    extra: Mapping[str, torch.Tensor],
    source: str,
) -> list[str]:
    """Check an adapter against `model`, then wrap what is missing and copy the tensors in."""
    modules = dict(model.named_modules())
    problems: list[str] = []
    to_wrap: dict[str, LoRASettings] = {}
    for name, s in plan.items():
        module = modules.get(name)
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
        else:
            shape = linear_shape(module)
            if shape is None:
                problems.append(f"{name}: is {type(module).__name__}, not a linear layer")
                continue
            to_wrap[name] = s
        (n_in, n_out), (a, b) = shape, lora[name]
        want_a, want_b = (s.rank, n_in), (n_out, s.rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(
                f"{name}: the adapter's A is {tuple(a.shape)} and B {tuple(b.shape)}, the model's "
                f"layer ({n_in} in, {n_out} out) needs A {want_a} and B {want_b}"
            )
    for name, _ in lora_modules(model):
        if name not in plan:
            problems.append(f"{name}: LoRA-wrapped in the model, but the adapter has no weights for it")
    state = model.state_dict()
    for key, tensor in extra.items():
        if key not in state:
            problems.append(f"{key}: the adapter holds this tensor, the model has no such entry")
        elif state[key].shape != tensor.shape:
            problems.append(f"{key}: {tuple(tensor.shape)} in the adapter, {tuple(state[key].shape)} in the model")
    if problems:
        raise ValueError(
            f"adapter {source} does not fit this {type(model).__name__} (was it trained on a "
            "model of another size or architecture?):\n  - " + "\n  - ".join(problems)
        )
    wrap_modules(model, to_wrap)
    wrappers = dict(lora_modules(model))
    with torch.no_grad():
        for name, (a, b) in lora.items():
            wrappers[name].lora.A.copy_(a)
            wrappers[name].lora.B.copy_(b)
    if extra:
        model.load_state_dict(dict(extra), strict=False)
    return list(plan)


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
    extra_tensors = _extra_state(model, extra)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common(s.dropout for s in settings.values()),
        "target_modules": sorted(settings),
        "rank_pattern": {n: s.rank for n, s in settings.items() if s.rank != r},
        "alpha_pattern": {n: s.alpha for n, s in settings.items() if s.alpha != alpha},
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
    unsupported = {
        "peft_type": (config.get("peft_type"), "LORA"),
        "use_dora": (config.get("use_dora") or False, False),
        "lora_bias": (config.get("lora_bias") or False, False),
        "bias": (config.get("bias") or "none", "none"),
    }
    bad = {k: have for k, (have, want) in unsupported.items() if have != want}
    if bad:
        raise ValueError(f"{config_file}: only plain LoRA adapters can be imported, this one has {bad}")
    r, alpha = config["r"], config["lora_alpha"]
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in _read_peft_weights(directory).items():
        key = key.removeprefix(PEFT_PREFIX)
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
