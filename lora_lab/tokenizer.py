"""Text to ids: the GPT-2 tokenizer (tiktoken's ``gpt2`` encoding, also offline from a ``gpt2.tiktoken``
file), the `Tokenizer` training needs of any model (GPT-2's or a Hugging Face one), and the prompts."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

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


# ---- prompts and the tokenizer training uses ------------------------------------------------------


ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def alpaca_prompt(entry: dict[str, str]) -> str:
    """The Alpaca prompt of the book's chapter 7, up to and including ``### Response:\\n``."""
    text = f"{ALPACA_HEADER}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text + "\n\n### Response:\n"


@dataclass
class Tokenizer:
    """What training needs of a tokenizer: text to ids and back, the pad and end ids, the most
    tokens the model takes, and the model's chat template when it has one."""

    encode: Callable[[str], list[int]]  # with the model's special tokens ([CLS] ... [SEP], BOS)
    decode: Callable[[list[int]], str]
    pad_id: int
    eos_id: int
    max_length: int
    chat: Callable[[list[dict[str, str]], bool], str] | None = field(default=None, repr=False)
    continuation: Callable[[str], list[int]] | None = field(default=None, repr=False)  # no special tokens
    whole: Callable[[str], list[int]] | None = field(default=None, repr=False)  # `encode` without cutting
    leading_special: int = 0  # special tokens `encode` puts first (BOS, [CLS]): kept when a prompt is cut
    turns: Callable[[list[dict[str, str]]], tuple[list[int], list[bool]]] | None = field(default=None, repr=False)

    def encode_tail(self, text: str, room: int) -> list[int]:
        """Ids of `text` (with the model's special tokens) cut to at most `room` by keeping its end,
        where a prompt's "### Response:" stands, and its leading special tokens."""
        ids = (self.whole or self.encode)(text)
        if len(ids) <= room:
            return ids
        head = ids[: min(self.leading_special, room - 1)] if room > 1 else []
        return head + ids[len(ids) - (room - len(head)) :]

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of text that follows a prompt (a response): without BOS or other special tokens."""
        return (self.continuation or self.encode)(text)

    def conversation(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """The ids of a chat as the model's chat template renders it, and which of them are the
        assistant's turns (each turn's content and the template's end of turn), to be learned."""
        if self.turns is None:
            raise ValueError("chat entries (messages) need a model with a chat template; this tokenizer has none")
        return self.turns(messages)

    def prompt(self, entry: dict[str, str], template: str = "alpaca") -> str:
        """The prompt text of an instruction entry: the Alpaca prompt, or the model's chat template."""
        if template == "alpaca":
            return alpaca_prompt(entry)
        if self.chat is None:
            raise ValueError("this tokenizer has no chat template: use the alpaca prompt")
        content = entry["instruction"] + (f"\n\n{entry['input']}" if entry.get("input") else "")
        return self.chat([{"role": "user", "content": content}], True)


def gpt2_text_tokenizer(max_length: int, bpe_file: str | os.PathLike | None = None) -> Tokenizer:
    """GPT-2's BPE (tiktoken) for GPTModel; pads with <|endoftext|> (50256), as the book does."""
    enc = gpt2_tokenizer(bpe_file)
    return Tokenizer(
        encode=lambda text: enc.encode(text, allowed_special={END_OF_TEXT}),
        decode=enc.decode,
        pad_id=END_OF_TEXT_ID,
        eos_id=END_OF_TEXT_ID,
        max_length=max_length,
    )


def hf_text_tokenizer(tok: object, max_length: int) -> Tokenizer:
    """A Hugging Face tokenizer: its own special tokens ([CLS] ... [SEP] for BERT), its pad token
    (else its end token), and its chat template if it has one."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ValueError(f"{type(tok).__name__} has neither a pad nor an end-of-text token; set tok.pad_token")
    chat = None
    if getattr(tok, "chat_template", None):
        chat = lambda messages, generation: tok.apply_chat_template(  # noqa: E731
            messages, tokenize=False, add_generation_prompt=generation
        )
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    turns = functools.partial(_assistant_turns, tok) if chat is not None else None
    # how many special tokens open every encoding ([CLS], BOS): where a text's first token lands
    plain, full = tok("a", add_special_tokens=False)["input_ids"], tok("a", add_special_tokens=True)["input_ids"]
    leading = full.index(plain[0]) if plain and plain[0] in full else 0
    return Tokenizer(
        # truncated by the tokenizer, which keeps the closing special token ([SEP])
        encode=lambda text: tok(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"],
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        pad_id=pad,
        eos_id=eos if eos is not None else pad,
        max_length=max_length,
        chat=chat,
        continuation=lambda text: tok(text, add_special_tokens=False)["input_ids"],
        whole=lambda text: tok(text, add_special_tokens=True, verbose=False)["input_ids"],  # no "too long" warning
        leading_special=leading,
        turns=turns,
    )


def _assistant_turns(tok, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """A chat tokenized as `tok.apply_chat_template(messages, tokenize=True)` tokenizes it, and which
    tokens fall in an assistant turn: from the end of the prompt the template renders before the turn
    (with the generation prompt) to the end of the conversation up to and with the turn."""

    def render(part: list[dict[str, str]], generation: bool = False) -> str:
        return tok.apply_chat_template(part, tokenize=False, add_generation_prompt=generation)

    full, spans = render(messages), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(
                "this chat template renders a conversation's start differently from the whole conversation, so "
                "its assistant turns cannot be told apart; give Alpaca entries (instruction, input, output)"
            )
        spans.append((len(before), len(through)))
    encoded = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    learn = [any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), learn
