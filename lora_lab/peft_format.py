"""Hugging Face PEFT's adapter format, both ways: a directory with ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys read ``base_model.model.<module>.lora_A.weight`` (A, rank x
in) and ``...lora_B.weight`` (B, out x rank): the same tensors as lora_lab's own file (`adapters.py`)
under other names and shapes, so moving between the two is a renaming, a reshape and a config.

| lora_lab (in the wrapper) | PEFT (after the module name)                                    |
|---------------------------|-----------------------------------------------------------------|
| lora.A, lora.B            | lora_A.weight, lora_B.weight (convolutions: kernel-shaped)      |
|                           | lora_embedding_A, lora_embedding_B (embeddings)                 |
| lora.bias                 | lora_B.bias (``lora_bias``)                                     |
| lora.magnitude            | lora_magnitude_vector (DoRA; convolutions: (1, out, 1, ...))    |
| out_lora.A, out_lora.B    | base_layer.out_proj.lora_A.weight, ... (nn.MultiheadAttention)  |
| base.bias (trained)       | base_layer.bias (PEFT's ``bias="lora_only"`` or ``"all"``)      |

An adapter whose config asks for anything else (another PEFT method, a rebuilt base) is refused by name.
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
from torch import nn

from .adapters import (
    apply_adapter,
    extra_state,
    plain_names,
    saved_adapter,
    trained_biases,
    warn_left_out,
    wrappers_by_name,
)
from .files import read_safetensors, save_safetensors, write_text
from .inject import LoRASettings
from .layers import ConvWithLoRA, EmbeddingWithLoRA, MultiheadAttentionWithLoRA
from .lora import LayerWithLoRA, LinearWithLoRA
from .named_adapters import DEFAULT_ADAPTER, adapter_names

PEFT_CONFIG, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
PEFT_PREFIX = "base_model.model."
_PEFT_LORA_KEY = re.compile(
    r"^(?P<name>.+?)\.(?P<part>(?:base_layer\.out_proj\.)?lora_(?:A|B|embedding_A|embedding_B|magnitude_vector))"
    r"(?:\.(?!weight$|bias$)[^.]+)?(?P<leaf>\.weight|\.bias)?$"
)  # an adapter name may sit before .weight (lora_A.default.weight), as in a PEFT model's own state dict
_FROM_PEFT = {
    ("lora_A", ".weight"): "lora.A",
    ("lora_B", ".weight"): "lora.B",
    ("lora_B", ".bias"): "lora.bias",
    ("lora_embedding_A", None): "lora.A",
    ("lora_embedding_B", None): "lora.B",
    ("lora_magnitude_vector", None): "lora.magnitude",
    ("lora_magnitude_vector", ".weight"): "lora.magnitude",
    ("base_layer.out_proj.lora_A", ".weight"): "out_lora.A",
    ("base_layer.out_proj.lora_B", ".weight"): "out_lora.B",
}
_TO_PEFT = {
    "lora.A": "lora_A.weight",
    "lora.B": "lora_B.weight",
    "lora.bias": "lora_B.bias",
    "lora.magnitude": "lora_magnitude_vector",
    "out_lora.A": "base_layer.out_proj.lora_A.weight",
    "out_lora.B": "base_layer.out_proj.lora_B.weight",
}
_TO_PEFT_EMBEDDING = {
    "lora.A": "lora_embedding_A",
    "lora.B": "lora_embedding_B",
    "lora.magnitude": "lora_magnitude_vector",
}


def _peft_tensor(wrapper: LayerWithLoRA, key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(PEFT's name after the module's, the tensor in PEFT's shape) for one adapter tensor of ours."""
    names = _TO_PEFT_EMBEDDING if isinstance(wrapper, EmbeddingWithLoRA) else _TO_PEFT
    if isinstance(wrapper, ConvWithLoRA):  # PEFT keeps A and B as convolution kernels
        base, ones = wrapper.base, [1] * len(wrapper.base.kernel_size)
        shapes = {
            "lora.A": (-1, base.in_channels, *base.kernel_size),
            "lora.B": (*tensor.shape, *ones),
            "lora.magnitude": (1, -1, *ones),
        }
        tensor = tensor.reshape(shapes.get(key, tensor.shape))
    return names[key], tensor


def _peft_bias_key(name: str, wrappers: Iterable[str]) -> str:
    """PEFT's key of a trained bias: a wrapped layer's ``x.base.bias`` is ``x.base_layer.bias``
    (attention's out_proj, wrapped inside PEFT's, ``x.base_layer.out_proj.base_layer.bias``)."""
    for w in wrappers:
        if name.startswith(f"{w}.base.out_proj."):
            return name.replace(f"{w}.base.out_proj.", f"{w}.base_layer.out_proj.base_layer.", 1)
        if name.startswith(f"{w}.base."):
            return name.replace(f"{w}.base.", f"{w}.base_layer.", 1)
    return name


def _our_bias_key(key: str) -> str:
    return key.replace(".out_proj.base_layer.", ".out_proj.").replace(".base_layer.", ".base.")


def _most_common(values: Iterable) -> object:
    return Counter(values).most_common(1)[0][0]


def _shared_flags(wrappers: Mapping[str, LayerWithLoRA], settings: Mapping[str, LoRASettings]) -> dict[str, bool]:
    """use_rslora, use_dora and lora_bias: one value each in PEFT's config, so one for every layer."""
    flags = {}
    for flag in ("use_rslora", "use_dora", "lora_bias"):
        values = {getattr(s, flag) for s in settings.values()}
        if len(values) > 1:
            raise ValueError(f"PEFT's format has one {flag} for all layers; this model mixes both")
        flags[flag] = values.pop()
    dora_attention = [n for n, w in wrappers.items() if isinstance(w, MultiheadAttentionWithLoRA) and flags["use_dora"]]
    if dora_attention:
        raise ValueError(f"{dora_attention}: PEFT has no DoRA for nn.MultiheadAttention, so it could not load this")
    return flags


def _targets_and_patterns(model: nn.Module, settings: Mapping[str, LoRASettings]) -> dict[str, object]:
    """r and lora_alpha (the most common), target_modules, and the patterns for the others."""
    r = _most_common(s.rank for s in settings.values())
    alpha = _most_common(s.alpha for s in settings.values())
    # PEFT matches target and pattern keys as suffixes ("proj" also matches "block.proj"): a name
    # that is the suffix of another module's gets an anchored regex, so it matches itself alone.
    names = list(plain_names(model, (n for n, _ in model.named_modules())))
    clashes = {n for n in settings if any(o.endswith("." + n) for o in names)}

    def key(name: str) -> str:
        return f"^{re.escape(name)}$" if name in clashes else name

    return {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common(s.dropout for s in settings.values()),
        # a list is matched by suffix, a string as one regex over full names
        "target_modules": "|".join(map(re.escape, sorted(settings))) if clashes else sorted(settings),
        "rank_pattern": {key(n): s.rank for n, s in settings.items() if s.rank != r},
        "alpha_pattern": {key(n): s.alpha for n, s in settings.items() if s.alpha != alpha},
    }


def export_peft_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    extra: Iterable[str] = (),
    name: str | None = None,
) -> Path:
    """Write the model's adapters in PEFT's format, laid out as PEFT's `save_pretrained` does: the
    one named "default" in `directory`, every other in ``directory/<name>``. `name`: that adapter
    alone. ``PeftModel.from_pretrained(base, directory)`` loads the default one, ``load_adapter(
    directory/<name>, adapter_name=<name>)`` the others; `import_peft_adapter` reads them back.

    The most common rank / alpha become `r` / `lora_alpha`, the others go to `rank_pattern` /
    `alpha_pattern` under full module names; `extra` modules become PEFT's `modules_to_save`;
    base biases trained beside LoRA set PEFT's `bias`. Returns `directory`.
    """
    directory = Path(directory)
    for adapter in [name] if name else adapter_names(model) or [None]:
        where = directory if adapter in (None, DEFAULT_ADAPTER) else directory / adapter
        _export_one(model, where, base_model_name_or_path, extra, adapter)
    return directory


def _export_one(
    model: nn.Module, directory: Path, base_model_name_or_path: str | None, extra: Iterable[str], name: str | None
) -> None:
    wrappers = wrappers_by_name(model, name)
    saved = {n: saved_adapter(w, name) for n, w in wrappers.items()}  # PiSSA / OLoRA converted, as PEFT saves
    settings = {n: s for n, (s, _) in saved.items()}
    flags = _shared_flags(wrappers, settings)
    extra_tensors = extra_state(model, extra)
    biases = trained_biases(model, extra_tensors, wrappers)
    warn_left_out(model, {**extra_tensors, **biases}, "export_peft_adapter")
    peft_biases = {k: _peft_bias_key(k, wrappers) for k in biases}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        **_targets_and_patterns(model, settings),
        **flags,
        # PEFT's flag for weights stored (in, out), as transformers' Conv1D does.
        "fan_in_fan_out": any(isinstance(w, LinearWithLoRA) and w._is_conv1d() for w in wrappers.values()),
        # "lora_only": only biases of wrapped layers train (their keys change); "all": others too
        "bias": "none" if not biases else "lora_only" if all(k != p for k, p in peft_biases.items()) else "all",
        "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in extra_tensors}) or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {PEFT_PREFIX + k: v for k, v in extra_tensors.items()}
    tensors.update({PEFT_PREFIX + peft_biases[k]: v for k, v in biases.items()})
    for name, w in wrappers.items():
        for ours, tensor in saved[name][1].items():
            peft_key, tensor = _peft_tensor(w, ours, tensor)
            tensors[f"{PEFT_PREFIX}{name}.{peft_key}"] = tensor
    save_safetensors(directory / PEFT_WEIGHTS, tensors, {"format": "pt"})
    write_text(directory / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")


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
    "modules_to_save", "init_lora_weights", "use_dora", "lora_bias", "bias",
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
            f"{source}: lora_lab imports LoRA adapters (peft_type LORA; r, lora_alpha, rsLoRA, DoRA, lora_bias, bias, "
            f"rank and alpha patterns, modules_to_save), and this one sets {bad}, which would change what the adapter "
            "computes. "
            "Load it with PEFT itself (PeftModel.from_pretrained), or, for PiSSA/OLoRA adapters, save them from "
            "PEFT converted to plain LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...))."
        )


def _split_peft_tensors(
    model: nn.Module, directory: Path, trains_biases: bool
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A PEFT adapter's tensors as ({module: {our key: tensor in our shape}}, other tensors under our
    names); a base weight it carries must be the model's own."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    plain_state = plain_names(model, state)
    for key, tensor in _read_peft_weights(directory).items():
        key = key.removeprefix(PEFT_PREFIX)
        match = _PEFT_LORA_KEY.match(key)
        if match and (match["part"], match["leaf"]) in _FROM_PEFT:
            # our tensors are 2-D (A, B) or 1-D (bias, magnitude); PEFT's convolutions keep kernel shapes
            ours = _FROM_PEFT[match["part"], match["leaf"]]
            flat = tensor.reshape(tensor.shape[0], -1) if ours[-1] in "AB" else tensor.reshape(-1)
            parts.setdefault(match["name"], {})[ours] = flat
        elif ".base_layer." in key and trains_biases and key.endswith(".bias"):
            extra[_our_bias_key(key)] = tensor  # a base bias trained beside LoRA (bias="lora_only" / "all")
        elif ".base_layer." in key:
            # PEFT saves the base weights of targeted embedding layers and heads too
            # (save_embedding_layers="auto"): fine when they are the model's own.
            plain = key.replace(".base_layer.", ".")
            wrapped = _our_bias_key(key)  # where it lives once we wrapped the layer
            have = state.get(plain_state.get(plain) or plain_state.get(wrapped, ""))
            if have is None or have.shape != tensor.shape or not torch.equal(have.to(tensor.dtype), tensor):
                raise ValueError(
                    f"{directory}: the adapter carries its own base weight {key}, which differs from the model's "
                    f"{plain} (a resized vocabulary?). lora_lab adapters never change base weights: resize the "
                    "model as it was for training first, or load the adapter with PEFT itself"
                )
        elif "lora_" in key:
            raise ValueError(f"{directory}: unsupported LoRA tensor {key} (a PEFT method lora_lab does not implement)")
        else:
            extra[key] = tensor  # modules_to_save, e.g. a classification head
    return parts, extra


def _adapter_directory(directory: Path, name: str | None) -> Path:
    """The directory of adapter `name` in a PEFT save: PEFT writes its "default" adapter at the top
    and every other one in a subdirectory of its name; a directory of one adapter is that adapter."""
    names = sorted(p.parent.name for p in directory.glob(f"*/{PEFT_CONFIG}"))
    if name not in (None, "default"):
        if not names and (directory / PEFT_CONFIG).is_file():
            return directory  # one adapter (PEFT's load_adapter(path, adapter_name=name) reads it so)
        if name not in names:
            raise FileNotFoundError(f"{directory} holds no adapter {name!r}; it holds {names or 'none by name'}")
        return directory / name
    if not (directory / PEFT_CONFIG).is_file():
        hint = f"; it holds the adapters {names}: name one (name=...)" if names else ""
        raise FileNotFoundError(
            f"no {PEFT_CONFIG} in {directory}: a PEFT adapter directory holds {PEFT_CONFIG} and "
            f"{PEFT_WEIGHTS} (PeftModel.save_pretrained or export_peft_adapter write them){hint}"
        )
    return directory


def import_peft_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> list[str]:
    """Load a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
    into `model`, wrapping the modules it names. A save of several PEFT adapters holds "default" at
    the top and the others in subdirectories: `name` picks one, which joins the model under that
    name (`named_adapters.py`); a directory of one adapter loads under `name` as it is. Without a
    name, the top one loads as `load_adapter` would (into the adapter the model runs, or as
    "default"). Returns the wrapped module names."""
    directory, adapter = _adapter_directory(Path(directory), name), name
    config_file = directory / PEFT_CONFIG
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON (corrupt?): {err}") from err
    _check_peft_config(config, config_file)
    r, alpha = config["r"], config["lora_alpha"]
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    parts, extra = _split_peft_tensors(model, directory, config.get("bias", "none") != "none")
    problems = [f"{n}: has no lora_A" for n, p in parts.items() if "lora.A" not in p]
    plan: dict[str, LoRASettings] = {}
    for name, p in parts.items():
        rank = p["lora.A"].shape[0] if "lora.A" in p else 0
        expected = _peft_pattern_value(rank_pattern, name, r)
        if rank != expected:
            problems.append(f"{name}: lora_A has rank {rank}, the config says {expected}")
        plan[name] = LoRASettings(
            rank,
            _peft_pattern_value(alpha_pattern, name, alpha),
            config.get("lora_dropout", 0.0),
            bool(config.get("use_rslora", False)),
            bool(config.get("use_dora", False)),
            bool(config.get("lora_bias", False)),
        )
    if problems:
        raise ValueError(f"{directory}: inconsistent PEFT adapter:\n  - " + "\n  - ".join(problems))
    attention = [n for n, p in parts.items() if "out_lora.A" in p]
    if attention:
        warnings.warn(
            f"{attention}: PEFT up to 0.21 adds nn.MultiheadAttention's out_proj update twice in its forward and "
            "merge (huggingface/peft#3774); lora_lab adds it once, as the adapter's math says, so these layers' "
            "outputs differ from what that PEFT computed with this adapter",
            stacklevel=2,
        )
    return apply_adapter(model, plan, parts, extra, str(directory), adapter)
