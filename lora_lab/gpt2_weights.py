"""Loading OpenAI's public GPT-2 weights into `GPTModel`, from Hugging Face's files.

Hugging Face keeps GPT-2 as OpenAI wrote it: `Conv1D` weights stored (in, out) and query, key and
value fused in one ``c_attn`` of width 3 * emb_dim. Loading splits ``c_attn`` into W_query, W_key
and W_value and transposes every weight into `nn.Linear`'s (out, in).
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import torch

from .files import read_safetensors
from .gpt2 import GPT2_ALIASES, GPT2_CONFIGS, HUB_IDS, GPTConfig, GPTModel

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HEADS_BY_WIDTH = {c.emb_dim: c.n_heads for c in GPT2_CONFIGS.values()}
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(masked_)?bias")  # causal-mask buffers, not weights
_FIX = "download it again (it may be truncated)"
T = TypeVar("T")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one checkpoint file, or of every shard an ``*.index.json`` names."""
    if path.name.endswith(".index.json"):  # a sharded checkpoint
        try:
            shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path} is not a sharded-checkpoint index (no weight_map): {err!r}. {_FIX}") from None
        return {k: v for shard in shards for k, v in _read_weights(path.parent / shard).items()}
    if path.suffix == ".safetensors":
        return read_safetensors(path, _FIX)[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a shard the index names?); {_FIX}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, not a checkpoint at all, pickled code: torch's errors vary
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (truncated, or not a weights file?): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. {_FIX}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _local_files(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a checkpoint directory or weights file."""
    if path.is_file():
        config = path.parent / "config.json"
        return path, config if config.is_file() else None
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            config = path / "config.json"
            return path / name, config if config.is_file() else None
    raise FileNotFoundError(
        f"{path} holds none of {list(WEIGHT_FILES)}. Put a Hugging Face GPT-2 checkpoint there, e.g. "
        "model.safetensors and config.json from https://huggingface.co/openai-community/gpt2/tree/main"
    )


def is_path_like(name: str | os.PathLike) -> bool:
    """True for what can only mean a file or folder: a PathLike, an absolute path, one starting
    with '.' or '~', or one that exists. Anything else may be a hub id."""
    text = os.fspath(name)
    return not isinstance(name, str) or os.path.isabs(text) or text.startswith((".", "~")) or os.path.exists(text)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (one short TCP connection), so that offline
    machines fail at once instead of after huggingface_hub's retries. False when HF_HUB_OFFLINE."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _from_hub(repo: str, what: str, fetch: Callable[[bool], T], local_files_only: bool) -> T:
    """`fetch(cached_only)` from the Hugging Face cache first, else once from the hub (unless
    `local_files_only`, or the hub does not answer); a clear FileNotFoundError when neither works."""
    reason = "not in the Hugging Face cache, and local_files_only is set"
    try:
        return fetch(True)
    except Exception:  # not cached: huggingface_hub's errors vary by version
        pass
    if not local_files_only:
        if hub_reachable():
            try:
                return fetch(False)
            except Exception as err:  # no such repo, gated, network broke off
                reason = f"the download failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        else:
            reason = "not in the Hugging Face cache, and the hub cannot be reached (offline, or HF_HUB_OFFLINE=1)"
    raise FileNotFoundError(
        f"could not get {what} of {repo}: {reason}. Download them from https://huggingface.co/{repo}/tree/main "
        f"into a directory and pass that directory, or fill the cache where you are online with "
        f"`hf download {repo}` (HF_HOME or cache_dir chooses where)."
    )


def hub_files(repo: str, files: list[str], cache_dir: str | None, local_files_only: bool) -> list[Path]:
    """`files` of hub repo `repo`, from the cache or downloaded once (see `_from_hub`)."""
    from huggingface_hub import hf_hub_download

    def fetch(cached_only: bool) -> list[Path]:
        return [Path(hf_hub_download(repo, f, cache_dir=cache_dir, local_files_only=cached_only)) for f in files]

    return _from_hub(repo, " and ".join(files), fetch, local_files_only)


def hub_snapshot(repo: str, patterns: list[str], local_files_only: bool = False) -> Path:
    """A local directory with the files of hub repo `repo` that match `patterns` (see `_from_hub`)."""
    from huggingface_hub import snapshot_download

    def fetch(cached_only: bool) -> Path:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=cached_only))

    return _from_hub(repo, " and ".join(patterns), fetch, local_files_only)


def _config(state: dict[str, torch.Tensor], hf: dict, source: str) -> GPTConfig:
    """GPTConfig from Hugging Face's config.json, or from the tensors' shapes if there is none."""
    unsupported = {
        k: hf[k]
        for k, ok in [
            ("activation_function", ("gelu_new", "gelu_pytorch_tanh")),
            ("scale_attn_by_inverse_layer_idx", (False,)),
            ("reorder_and_upcast_attn", (False,)),
        ]
        if k in hf and hf[k] not in ok
    }
    if unsupported:
        raise ValueError(f"{source}: GPTModel implements the original GPT-2; this checkpoint sets {unsupported}")
    wte = state["wte.weight"]
    layers = {int(m[1]) for k in state if (m := re.match(r"h\.(\d+)\.", k))}
    heads = hf.get("n_head", _HEADS_BY_WIDTH.get(wte.shape[1]))
    if heads is None:
        raise ValueError(
            f"{source}: no config.json beside the weights, and width {wte.shape[1]} is no GPT-2 size; "
            "put the checkpoint's config.json next to it"
        )
    return GPTConfig(
        vocab_size=wte.shape[0],
        context_length=state["wpe.weight"].shape[0],
        emb_dim=wte.shape[1],
        n_heads=heads,
        n_layers=len(layers),
        qkv_bias=True,
        # transformers' default is tied, whether or not the file also holds lm_head.weight
        tie_embeddings=hf.get("tie_word_embeddings", True),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        scale_attn=hf.get("scale_attn_weights", True),
    )


def convert_hf_gpt2(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A Hugging Face GPT-2 state dict (keys ``h.N.attn.c_attn.weight`` ..., with or without the
    ``transformer.`` prefix) as a GPTModel state dict. Every weight must be used exactly once."""
    sd = {k.removeprefix("transformer."): v for k, v in state.items()}

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"the checkpoint lacks {key}: not a GPT-2 checkpoint with {cfg.n_layers} layers?")
        return sd.pop(key)

    def linear(prefix: str) -> dict[str, torch.Tensor]:  # Conv1D (in, out) -> nn.Linear (out, in)
        return {"weight": take(prefix + ".weight").T.contiguous(), "bias": take(prefix + ".bias")}

    out = {
        "tok_emb.weight": take("wte.weight"),
        "pos_emb.weight": take("wpe.weight"),
        "final_norm.scale": take("ln_f.weight"),
        "final_norm.shift": take("ln_f.bias"),
    }
    for i in range(cfg.n_layers):
        h, o = f"h.{i}.", f"trf_blocks.{i}."
        qkv_w = take(h + "attn.c_attn.weight").chunk(3, dim=1)  # (C, 3C) -> 3 x (C, C)
        qkv_b = take(h + "attn.c_attn.bias").chunk(3)
        for name, w, b in zip(("W_query", "W_key", "W_value"), qkv_w, qkv_b, strict=True):
            out[f"{o}att.{name}.weight"], out[f"{o}att.{name}.bias"] = w.T.contiguous(), b
        parts = {
            "att.out_proj": linear(h + "attn.c_proj"),
            "ff.layers.0": linear(h + "mlp.c_fc"),
            "ff.layers.2": linear(h + "mlp.c_proj"),
        }
        out.update({f"{o}{name}.{k}": v for name, p in parts.items() for k, v in p.items()})
        for norm, ln in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{o}{norm}.scale"], out[f"{o}{norm}.shift"] = take(h + ln + ".weight"), take(h + ln + ".bias")
    head = sd.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        out["out_head.weight"] = head if head is not None else out["tok_emb.weight"].clone()
    leftover = [k for k in sd if not _MASK_BUFFER.fullmatch(k)]
    if leftover:
        raise ValueError(f"the checkpoint has tensors GPTModel has no place for: {leftover[:8]}")
    return out


def load_gpt2(
    name_or_path: str | os.PathLike,
    *,
    tie_embeddings: bool | None = None,
    drop_rate: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> GPTModel:
    """GPTModel with OpenAI's weights.

    `name_or_path`: a local directory (``model.safetensors`` or ``pytorch_model.bin``, and
    ``config.json``), a weights file, a size name (``gpt2-124m`` ... ``gpt2-1558m``, or ``gpt2``,
    ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``) or a hub id, downloaded once into the Hugging
    Face cache. `tie_embeddings`: None keeps what the checkpoint does (tied for OpenAI's); False
    gives `out_head` its own copy, as in the book.
    """
    if is_path_like(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"no such file or directory: {path}. Give a directory with model.safetensors (or "
                "pytorch_model.bin) and config.json, a weights file, or a GPT-2 name such as 'gpt2-124m'"
            )
        weights_file, config_file = _local_files(path)
    else:
        name = str(name_or_path)
        repo = HUB_IDS.get(GPT2_ALIASES.get(name, name)) or (name if "/" in name else None)
        if repo is None:
            raise FileNotFoundError(
                f"{name!r} is neither a local checkpoint nor a GPT-2 name ({list(HUB_IDS)}, {list(GPT2_ALIASES)})"
            )
        config_file, weights_file = hub_files(repo, ["config.json", "model.safetensors"], cache_dir, local_files_only)
    state = {k.removeprefix("transformer."): v for k, v in _read_weights(weights_file).items()}
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON (corrupt?): {err}") from None
    cfg = _config(state, hf_config, str(name_or_path))
    tie = cfg.tie_embeddings if tie_embeddings is None else tie_embeddings
    cfg = replace(cfg, drop_rate=drop_rate, tie_embeddings=tie)
    converted = {k: v.to(dtype) for k, v in convert_hf_gpt2(state, cfg).items()}
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = GPTModel(cfg)
    try:
        missing, _ = model.load_state_dict(converted, strict=False, assign=True)
    except RuntimeError as err:  # shapes that disagree with config.json
        raise ValueError(f"{name_or_path}: weights do not fit the config: {err}") from err
    if cfg.tie_embeddings:  # assign=True set a separate Parameter: share the embedding again
        model.out_head.weight = model.tok_emb.weight
        missing = [k for k in missing if k != "out_head.weight"]
    if missing:
        raise ValueError(f"{name_or_path}: the checkpoint has no weights for {missing[:8]}")
    return model.to(device).eval()
