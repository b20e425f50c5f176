"""Hugging Face PEFT's adapter format, both ways: a directory with ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys read ``base_model.model.<module>.lora_A.weight`` (A, rank x
in) and ``...lora_B.weight`` (B, out x rank): the same tensors as lora_lab's own file (`adapters.py`)
under other names, so moving between the two is a renaming plus a config. An adapter whose config asks
for anything but plain LoRA is refused by name.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .adapters import apply_adapter, extra_state, lora_settings, plain_names, warn_left_out, wrappers_by_name
from .files import read_safetensors, save_safetensors, write_text
from .inject import LoRASettings

PEFT_CONFIG, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
PEFT_PREFIX = "base_model.model."
_PEFT_LORA_KEY = re.compile(r"^(?P<name>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


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
    wrappers = wrappers_by_name(model)
    settings = {n: lora_settings(w) for n, w in wrappers.items()}
    rslora = {s.use_rslora for s in settings.values()}
    if len(rslora) > 1:
        raise ValueError("PEFT's format has one use_rslora for all layers; this model mixes both")
    r = _most_common(s.rank for s in settings.values())
    alpha = _most_common(s.alpha for s in settings.values())
    # PEFT matches target and pattern keys as suffixes ("proj" also matches "block.proj"): a name
    # that is the suffix of another module's gets an anchored regex, so it matches itself alone.
    names = list(plain_names(model, (n for n, _ in model.named_modules())))
    clashes = {n for n in settings if any(o.endswith("." + n) for o in names)}

    def key(name: str) -> str:
        return f"^{re.escape(name)}$" if name in clashes else name

    extra_tensors = extra_state(model, extra)
    warn_left_out(model, extra_tensors, "export_peft_adapter")
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
    save_safetensors(directory / PEFT_WEIGHTS, tensors, {"format": "pt"})
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
    plain_state = plain_names(model, state)
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
    return apply_adapter(model, plan, {n: (p["A"], p["B"]) for n, p in parts.items()}, extra, str(directory))
