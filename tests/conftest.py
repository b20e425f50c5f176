"""Tiny seeded models shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn


@pytest.fixture(scope="session", autouse=True)
def _gguf_cache(tmp_path_factory):
    """The suite's GGUF checkpoints (lora_lab.gguf) in one folder of its own, not the user's cache."""
    before = os.environ.get("LORA_LAB_CACHE")
    os.environ["LORA_LAB_CACHE"] = str(tmp_path_factory.mktemp("lora_lab_cache"))
    yield
    if before is None:
        del os.environ["LORA_LAB_CACHE"]
    else:
        os.environ["LORA_LAB_CACHE"] = before


class TinyBlock(nn.Module):
    """Attention-like and feed-forward linears, named as in the book's GPT."""

    def __init__(self, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.att = nn.Module()
        self.att.W_query = nn.Linear(d, d, bias=False)
        self.att.W_key = nn.Linear(d, d, bias=False)
        self.att.W_value = nn.Linear(d, d, bias=False)
        self.att.out_proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.att.W_query(x), self.att.W_key(x), self.att.W_value(x)
        w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.att.out_proj(w @ v)
        return x + self.ff(self.norm(x))


class TinyModel(nn.Module):
    """Embedding, two blocks and an output head (`out_head`), like a miniature GPT."""

    def __init__(self, vocab: int = 50, d: int = 16, n_blocks: int = 2, tie: bool = False) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(TinyBlock(d) for _ in range(n_blocks))
        self.out_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.out_head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.out_head(x)


def tiny_model(seed: int = 0, **kwargs) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel(**kwargs)


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    """Give every B non-zero values so that adapters change the output."""
    from lora_lab.lora import lora_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, w in lora_modules(model):
            w.lora.B.copy_(torch.randn(w.lora.B.shape, generator=g) * 0.1)


def tiny_hf_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(42))


try:  # the quant extra: bitsandbytes runs its 4-bit and 8-bit linears on the CPU too
    import bitsandbytes as bnb
except ImportError:
    bnb = None
# Per test, never per file: without bitsandbytes every other test of a file still runs.
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes not installed (pip install -e '.[quant]')")


# Real data beside the repository (../shared/data), or wherever LORA_LAB_DATA points.
SHARED_DATA = Path(os.environ.get("LORA_LAB_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_file(relative: str) -> Path:
    """A file of the shared data folder; skipped where there is none (a fresh clone), failed in CI."""
    path = SHARED_DATA / relative
    if not path.is_file():
        message = f"{path} not found; set LORA_LAB_DATA to the shared data folder"
        if os.environ.get("CI"):  # CI always has the data: its absence is a broken setup
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def bpe_file() -> Path:
    return shared_file("tokenizers/gpt2.tiktoken")


def tiny_gpt(seed: int = 0, **overrides):
    from lora_lab import GPTConfig, GPTModel

    torch.manual_seed(seed)
    cfg = dict(vocab_size=50, context_length=16, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)
    return GPTModel(GPTConfig(**{**cfg, **overrides})).eval()


def tiny_llama(seed: int = 0, tie: bool = False):
    """A two-layer Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A two-layer BERT (hidden 64) with a word-piece vocabulary of single letters, saved as a Hugging Face
    checkpoint (config, safetensors, tokenizer): a model `--model DIR` loads in a subprocess."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS])}
    tokenizer = BertTokenizerFast(vocab=vocab, model_max_length=32)
    assert tokenizer("a b z")["input_ids"] == [2, 5, 6, 30, 3]  # every letter known (a vocab_file is not read in 5.x)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    # widths of 64 and 128: bitsandbytes' CPU inference kernels take 4-bit layers of 64 inputs or more
    cfg = BertConfig(vocab_size=31, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    BertModel(cfg).save_pretrained(folder)
    return folder


def letters_csv(path: Path, n: int = 96, seed: int = 0) -> Path:
    """Texts of 3 to 10 space-separated letters, label 1 when the last is 'z': learnable by a tiny
    model in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    lines = ["text,label"]
    for i in range(n):
        length = int(torch.randint(3, 11, (1,), generator=g))
        letters = [LETTERS[int(k)] for k in torch.randint(0, 20, (length,), generator=g)]
        if i % 2:
            letters[-1] = "z"
        lines.append(f"{' '.join(letters)},{i % 2}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def letters_data(tmp_path_factory) -> Path:
    return letters_csv(tmp_path_factory.mktemp("letters") / "letters.csv")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Plain `python -m pytest -q` leaves out the tests marked real (and slow): say so, and how to run them."""
    deselected = terminalreporter.stats.get("deselected", [])
    real = [item for item in deselected if item.get_closest_marker("real")]
    if real and "real" not in (config.getoption("markexpr") or "").replace("not real", ""):
        terminalreporter.write_line(
            f"{len(real)} real-model tests were left out (they take minutes): python -m pytest -q -m 'not slow' "
            "runs them too, as CI does"
        )
