"""GPT-2 from scratch, with the module names of "Build a Large Language Model (From Scratch)".

`GPTModel` reads like the book's (``tok_emb``, ``trf_blocks[i].att.W_query``, ``ff.layers[0]``,
``final_norm``, ``out_head``), so the book's chapter-6 and appendix-E code runs on it unchanged,
and it loads OpenAI's public weights from Hugging Face's files to reproduce their logits. Query,
key and value are separate linears, so LoRA can target each.

Loading the public weights lives in `gpt2_weights.py`, the tokenizer in `tokenizer.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    """The book's configuration keys. `tie_embeddings` shares one matrix between `tok_emb` and
    `out_head` (the public GPT-2 checkpoints do; the book keeps two, hence the default).
    `norm_eps` and `scale_attn` are Hugging Face's `layer_norm_epsilon` and `scale_attn_weights`
    (divide attention scores by sqrt(head_dim)); GPT-2 uses 1e-5 and True."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    scale_attn: bool = True

    def __post_init__(self) -> None:
        for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT config {key} must be a positive integer, got {value!r}")
        for key in ("qkv_bias", "tie_embeddings", "scale_attn"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"GPT config {key} must be True or False, got {getattr(self, key)!r}")
        for key, low, high in (("drop_rate", 0.0, 1.0), ("norm_eps", 0.0, 1.0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
                raise ValueError(f"GPT config {key} must be a number in [{low}, {high}), got {value!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"GPT config emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}): "
                "each head gets emb_dim / n_heads dimensions"
            )

    @classmethod
    def from_dict(cls, cfg: dict) -> GPTConfig:
        """Accept the book's plain dicts (``GPT_CONFIG_124M``, ``BASE_CONFIG``). The book's seven
        keys must all be there (a missing one would silently take GPT-2 124M's value)."""
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown GPT config keys {sorted(unknown)}; known: {sorted(known)}")
        missing = [k for k in BOOK_KEYS if k not in cfg]
        if missing:
            raise ValueError(
                f"GPT config lacks {missing}; the book's configs set all of {list(BOOK_KEYS)} "
                "(e.g. GPT2_CONFIGS['gpt2-124m'] or the book's GPT_CONFIG_124M)"
            )
        return cls(**cfg)


BOOK_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")


# Parameter counts with the head tied to the token embedding, as in the public checkpoints
# (and in Hugging Face's count); untied, in brackets, the head adds vocab_size * emb_dim.
_SIZE = {"qkv_bias": True, "tie_embeddings": True}
GPT2_CONFIGS: dict[str, GPTConfig] = {
    "gpt2-124m": GPTConfig(emb_dim=768, n_layers=12, n_heads=12, **_SIZE),  # 124,439,808 (untied 163,037,184)
    "gpt2-355m": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16, **_SIZE),  # 354,823,168 (406,286,336)
    "gpt2-774m": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20, **_SIZE),  # 774,030,080 (838,359,040)
    "gpt2-1558m": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25, **_SIZE),  # 1,557,611,200 (1,638,022,400)
}
GPT2_ALIASES = {"gpt2": "gpt2-124m", "gpt2-medium": "gpt2-355m", "gpt2-large": "gpt2-774m", "gpt2-xl": "gpt2-1558m"}
HUB_IDS = {
    "gpt2-124m": "openai-community/gpt2",
    "gpt2-355m": "openai-community/gpt2-medium",
    "gpt2-774m": "openai-community/gpt2-large",
    "gpt2-1558m": "openai-community/gpt2-xl",
}


def config_from_openai_settings(settings: dict) -> GPTConfig:
    """Map OpenAI's ``hparams.json`` (n_vocab, n_ctx, n_embd, n_head, n_layer) to a GPTConfig."""
    return GPTConfig(
        vocab_size=settings["n_vocab"],
        context_length=settings["n_ctx"],
        emb_dim=settings["n_embd"],
        n_heads=settings["n_head"],
        n_layers=settings["n_layer"],
        qkv_bias=True,
        tie_embeddings=True,
    )


class LayerNorm(nn.Module):
    """The book's LayerNorm (parameters `scale` and `shift`), computed by the fused kernel."""

    def __init__(self, emb_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with separate query, key and value projections."""

    def __init__(
        self, d_in: int, d_out: int, dropout: float, num_heads: int, qkv_bias: bool = False, scale: bool = True
    ) -> None:
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, d_out // num_heads
        self.scale = self.head_dim**-0.5 if scale else 1.0  # on the scores q k^T
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.use_sdpa = True  # False: the explicit softmax(QK^T / sqrt(d) + mask) V, for reading and tests

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask`: None for plain causal attention, or a (B, 1, T, T) boolean, True where allowed."""
        b, t, _ = x.shape
        q, k, v = (  # each (B, H, T, head_dim)
            proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.W_query, self.W_key, self.W_value)
        )
        if self.use_sdpa:
            p = self.dropout.p if self.training else 0.0
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None, scale=self.scale
            )
        else:
            if mask is None:
                mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, T, T)
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            ctx = self.dropout(weights) @ v
        return self.out_proj(ctx.transpose(1, 2).reshape(b, t, -1))  # (B, T, d_out)


class FeedForward(nn.Module):
    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(emb_dim, 4 * emb_dim), nn.GELU(approximate="tanh"), nn.Linear(4 * emb_dim, emb_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.att = MultiHeadAttention(
            cfg.emb_dim, cfg.emb_dim, cfg.drop_rate, cfg.n_heads, cfg.qkv_bias, cfg.scale_attn
        )
        self.ff = FeedForward(cfg.emb_dim)
        self.norm1 = LayerNorm(cfg.emb_dim, cfg.norm_eps)
        self.norm2 = LayerNorm(cfg.emb_dim, cfg.norm_eps)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), mask))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2. `cfg` is a GPTConfig or the book's dict; `model(idx)` returns (B, T, vocab) logits."""

    def __init__(self, cfg: GPTConfig | dict) -> None:
        super().__init__()
        cfg = GPTConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim, cfg.norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        self.gradient_checkpointing = False  # True: blocks recompute their activations in backward (less memory)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each block's activations in the backward pass (non-reentrant torch checkpointing),
        as Hugging Face models' method of the same name does."""
        self.gradient_checkpointing = True

    def forward(
        self,
        in_idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`attention_mask` (B, T), 1 for real tokens and 0 for padding, keeps padding out of the
        keys. `position_ids` (B, T) default to 0..T-1, as in Hugging Face's GPT-2; left-padded
        prompts (see `generate`) pass positions that start at each row's first real token."""
        b, t = in_idx.shape
        if t > self.cfg.context_length:
            raise ValueError(f"sequence of {t} tokens is longer than the context ({self.cfg.context_length})")
        if position_ids is None:
            position_ids = torch.arange(t, device=in_idx.device)
        x = self.tok_emb(in_idx) + self.pos_emb(position_ids)  # (B, T, C)
        x = self.drop_emb(x)
        mask = None
        if attention_mask is not None:
            causal = torch.ones(t, t, dtype=torch.bool, device=in_idx.device).tril()
            # a padded query may see itself, so no row is all -inf (NaN); real tokens never see padding
            itself = torch.eye(t, dtype=torch.bool, device=in_idx.device)
            mask = (causal & attention_mask.bool()[:, None, None, :]) | itself  # (B, 1, T, T)
        for block in self.trf_blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.out_head(self.final_norm(x))  # (B, T, vocab)


# LoRA targets by name (use with inject_lora). "attn+ffn" are the book's six linears per block.
_ATTN = ["W_query", "W_key", "W_value", "out_proj"]
_FFN = ["ff.layers.0", "ff.layers.2"]
# "all-linear" is the same six: the head is added only when asked.
LORA_PRESETS = {
    "attn": _ATTN,
    "attn-qv": ["W_query", "W_value"],
    "ffn": _FFN,
    "attn+ffn": _ATTN + _FFN,
    "all-linear": _ATTN + _FFN,
}


def lora_targets(preset: str, include_head: bool = False) -> list[str]:
    """Target names for a LoRA preset on GPTModel: attn, attn-qv, ffn, attn+ffn or all-linear
    (attn+ffn, plus `out_head` when `include_head`)."""
    if preset not in LORA_PRESETS:
        raise ValueError(f"unknown LoRA preset {preset!r}: use one of {list(LORA_PRESETS)}")
    return list(LORA_PRESETS[preset]) + (["out_head"] if include_head else [])


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    context_size: int | None = None,
) -> torch.Tensor:
    """Extend `idx` (B, T) by up to `max_new_tokens`: greedy at temperature 0, else sampled from
    the top-k (None or 0: all tokens). A row that produced `eos_id` gets `eos_id` from then on;
    generation stops when every row has. Call `model.eval()` first to switch dropout off.

    A batch of prompts of different lengths is padded on the left, with `attention_mask` (B, T)
    0 on the padding: padding is kept out of attention and positions start at each row's first
    real token, so each row gets the tokens it would get alone. `context_size` (the book's
    argument) defaults to the model's context length.
    """
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(
            f"idx must be a (batch, tokens) tensor with at least one token, got shape {tuple(idx.shape)}; "
            "to generate from nothing, start from the end-of-text token (50256 for GPT-2)"
        )
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be None, 0 (off) or a positive number of tokens, got {top_k}")
    if context_size is not None and context_size <= 0:
        raise ValueError(f"context_size must be a positive number of tokens, got {context_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    cfg = getattr(model, "cfg", None)
    context = context_size or getattr(cfg, "context_length", None) or idx.shape[1] + max_new_tokens
    mask = None
    if attention_mask is not None:
        if attention_mask.shape != idx.shape:
            raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}, idx {tuple(idx.shape)}")
        mask = attention_mask.to(device=idx.device, dtype=torch.long)
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError("pad prompts on the left for generation: attention_mask must be 0s then 1s in each row")
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        window = idx[:, -context:]
        if mask is None:
            logits = model(window)
        else:
            window_mask = mask[:, -context:]
            positions = (window_mask.cumsum(dim=1) - 1).clamp(min=0)  # 0 at each row's first real token
            logits = model(window, attention_mask=window_mask, position_ids=positions)
        logits = logits[:, -1, :].float()  # (B, vocab)
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), num_samples=1)
        else:
            nxt = logits.argmax(dim=-1, keepdim=True)
        if eos_id is not None:
            nxt = nxt.masked_fill(done[:, None], eos_id)
            done |= nxt[:, 0] == eos_id
        idx = torch.cat([idx, nxt], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        if eos_id is not None and done.all():
            break
    return idx
