"""GGUF files converted once. transformers parses a GGUF file's metadata and dequantizes its tensors at
every load (about 25 s for SmolLM2-135M, its tokenizer included, on 2 cores); the first load here writes
the model and tokenizer it gives as a Hugging Face checkpoint in a cache folder ($LORA_LAB_CACHE, else
~/.cache/lora_lab), which later loads (a sweep's points, `load_run`, `generate`, other processes) read in
a second or two. The folder's name holds the file's path, size and time and transformers' version: a file
changed since, or another transformers, converts again. Files over MAX_BYTES (their fp32 checkpoint would
take up to eight times their size) and caches that cannot be written load from the GGUF each time."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

MAX_BYTES = 512 * 2**20


def cache_root() -> Path:
    return Path(os.environ.get("LORA_LAB_CACHE") or Path.home() / ".cache" / "lora_lab") / "gguf"


def as_checkpoint(directory: str, gguf: str) -> tuple[str, str | None]:
    """(directory, GGUF file or None) to load `directory/gguf` from: its Hugging Face checkpoint in the
    cache (written at the first call), or the GGUF file itself when it is over MAX_BYTES or the cache
    cannot be written."""
    import transformers

    path = Path(directory, gguf).resolve()
    stat = path.stat()
    if stat.st_size > MAX_BYTES:
        return directory, gguf
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    folder = cache_root() / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not (folder / "model.safetensors").is_file():
        try:
            _convert(directory, gguf, folder)
        except OSError as err:  # a read-only home, a full disk: the GGUF still loads, slowly
            warnings.warn(f"could not cache {path.name} as a checkpoint in {folder.parent} ({err}); set "
                          "LORA_LAB_CACHE to a writable folder to load it faster", stacklevel=3)  # fmt: skip
            return directory, gguf
    return str(folder), None


def _convert(directory: str, gguf: str, folder: Path) -> None:
    """Write the checkpoint in a folder beside `folder` and rename it into place in one step (a process
    that converts the same file at the same time keeps the first one renamed)."""
    import transformers

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        # GGUF files hold causal LMs; a classifier loads its body from this checkpoint as from the GGUF
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
        config = copy.deepcopy(model.config)  # dequantized already: not a GGUF-quantized model any more
        del config.quantization_config
        config.save_pretrained(tmp)
        transformers.AutoTokenizer.from_pretrained(directory, gguf_file=gguf).save_pretrained(tmp)
        save_file(_first_names(model.state_dict()), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _first_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor once, under its first name: a tied output head is saved as the input embedding it is
    (a classifier built from the checkpoint has no output head to read it from; a causal LM ties it back)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    first = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            first[name] = tensor.contiguous()
    return first
