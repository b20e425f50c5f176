"""GGUF files read once per process. transformers parses a GGUF file's metadata and dequantizes its
tensors at every load (about 25 s for SmolLM2-135M, its tokenizer included, on 2 cores); the first load
here writes the model and tokenizer it gives as a Hugging Face checkpoint in a temporary folder, which
the process's later loads (a sweep's points, `load_run`, `generate`) read in a second or two. The folder
goes when the process ends. Files over MAX_BYTES load from the GGUF each time: their dequantized fp32
copy would take up to eight times their size on disk."""

from __future__ import annotations

import atexit
import copy
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_model

MAX_BYTES = 512 * 2**20
_converted: dict[tuple[str, int, int], Path] = {}  # (file, mtime, size) -> its checkpoint folder


def as_checkpoint(directory: str, gguf: str) -> tuple[str, str | None]:
    """(directory, GGUF file or None) to load `directory/gguf` from: this process's Hugging Face
    checkpoint of it (written at the first call), or the GGUF file itself when it is over MAX_BYTES."""
    import transformers

    path = Path(directory, gguf)
    stat = path.stat()
    if stat.st_size > MAX_BYTES:
        return directory, gguf
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)  # a file changed since is read again
    folder = _converted.get(key)
    if folder is None or not (folder / "config.json").is_file():
        folder = Path(tempfile.mkdtemp(prefix="lora_lab-gguf-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        # GGUF files hold causal LMs; a classifier loads its body from this checkpoint as from the GGUF
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
        config = copy.deepcopy(model.config)  # dequantized already: not a GGUF-quantized model any more
        del config.quantization_config
        config.save_pretrained(folder)
        save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})  # tied weights once
        transformers.AutoTokenizer.from_pretrained(directory, gguf_file=gguf).save_pretrained(folder)
        _converted[key] = folder
    return str(folder), None
