"""The GPT-2 tokenizer (tiktoken's ``gpt2`` encoding), also offline from a ``gpt2.tiktoken`` file."""

from __future__ import annotations

import functools
import os

import tiktoken
import tiktoken.load

BPE_ENV = "LORA_LAB_GPT2_BPE"
BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's pin for r50k_base
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
# GPT-2's pre-tokenizer: contractions, letters, digits, other symbols, white space.
_GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=4)
def _from_file(path: str) -> tiktoken.Encoding:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GPT-2 BPE file {path} not found (from the argument or ${BPE_ENV})")
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(path, expected_hash=BPE_SHA256)
    except ValueError as err:
        raise ValueError(f"{path} is not the GPT-2 BPE vocabulary (gpt2.tiktoken / r50k_base): {err}") from err
    return tiktoken.Encoding(
        name="gpt2", pat_str=_GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={END_OF_TEXT: END_OF_TEXT_ID}
    )


def gpt2_tokenizer(bpe_file: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """GPT-2's BPE tokenizer. From `bpe_file` or ``$LORA_LAB_GPT2_BPE`` when given (no network),
    else tiktoken's own ``gpt2`` encoding, which tiktoken downloads once and caches."""
    path = bpe_file or os.environ.get(BPE_ENV)
    if path:
        return _from_file(os.fspath(path))
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # offline and not cached: requests' and tiktoken's errors vary
        raise FileNotFoundError(
            "tiktoken could not load its 'gpt2' encoding (offline, nothing cached?). Point lora_lab to a "
            f"local copy: gpt2_tokenizer('path/to/gpt2.tiktoken') or {BPE_ENV}=path/to/gpt2.tiktoken. The file is "
            "tiktoken's r50k_base ranks, https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
        ) from err
