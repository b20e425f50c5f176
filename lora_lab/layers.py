"""The layer kinds beyond linears: embeddings, convolutions and torch's multi-head attention.

Each kind sees its weight in the linear layout (out, in), where ``delta W = scaling * B A`` with A
(rank, in) and B (out, rank) as for a linear layer (`lora.py`); what changes is how the branch runs
and where the weight lives. Shapes, initialisation and the order of operations follow PEFT, so
adapters move between the two (`peft_format.py`).

- `nn.Embedding(num, dim)`, weight E (num, dim): as a linear map of one-hot rows its weight is
  E^T, so in = num and out = dim, and ``y = E[x] + scaling * A^T[x] B^T``: A's columns are looked
  up like embedding rows. A starts at zero and B normal (the other way round from linears, as in
  loralib and PEFT); the lookup uses the base's padding_idx and max_norm; no dropout on indices.
- `nn.Conv1d/2d/3d`, weight (out, in / groups, *kernel): A is a convolution with the base's
  kernel, stride, padding, dilation and padding mode into `rank` channels (in = in_channels times
  the kernel size), B a 1x1 convolution out of them, so ``delta W = scaling * (B A).view(kernel)``.
  With groups > 1, B is grouped (rank / groups channels per group, as PEFT) and the update spans
  all input channels, which a grouped kernel cannot hold: such layers run unmerged only.
- `nn.MultiheadAttention`: `F.multi_head_attention_forward` reads `in_proj_weight` (3E, E) and
  `out_proj.weight` (E, E) itself, so no layer call can be wrapped. Both get LoRA, as in PEFT:
  `lora` on the packed q, k, v projection and `out_lora` on the output, and the forward runs the
  base module with the updated weights swapped in (`torch.func.functional_call`), which autograd
  follows to A and B. Dropout does not apply (weights are adapted, not an input), as in PEFT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .lora import LayerWithLoRA, LinearWithLoRA, LoRALayer, linear_shape
from .variants import dora_scale, dora_weight, row_norm, undora_weight


class EmbeddingWithLoRA(LayerWithLoRA):
    """A frozen `nn.Embedding` plus LoRA: ``y = E[x] + scaling * A^T[x] B^T`` (see the module doc)."""

    def __init__(
        self,
        base: nn.Embedding,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        lora_bias: bool = False,
        use_dora: bool = False,
    ) -> None:
        if lora_bias:
            raise ValueError("lora_bias is not defined for embeddings (PEFT refuses it too): leave it off here")
        if base.sparse:
            raise ValueError(
                "an nn.Embedding with sparse=True: the LoRA branch's gradient cannot be sparse (PEFT fails in "
                "backward there); build the embedding with sparse=False to adapt it"
            )
        # Dropout is not applied to token indices (PEFT does not either), so none is kept.
        super().__init__(base, base.num_embeddings, base.embedding_dim, rank, alpha, 0.0, use_rslora, use_dora=use_dora)
        nn.init.zeros_(self.lora.A)
        nn.init.normal_(self.lora.B)
        self.init_dora()

    def base_weight(self) -> torch.Tensor:
        return self.base.weight.float().T  # (dim, num)

    def _write_base_weight(self, weight: torch.Tensor) -> None:
        self.base.weight.copy_(weight.T)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        base, lora = self.base, self.lora
        rows = F.embedding(
            x, lora.A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )  # (..., rank)
        out = (rows @ lora.B.T) * lora.scaling  # (..., dim)
        scale = getattr(base, "embed_scale", None)  # Gemma-style embeddings scale their output
        return out if scale is None else out * torch.as_tensor(scale, dtype=out.dtype, device=out.device)

    def merge_problem(self, allow_quantized: bool = False) -> str | None:
        if self.base.max_norm is not None:
            return (
                f"an embedding with max_norm={self.base.max_norm}: each looked-up row is rescaled to that norm, so "
                "E + delta E rescaled is not E rescaled plus the update (PEFT merges it anyway and changes the "
                "outputs). Keep the adapter unmerged; it runs as it is"
            )
        return super().merge_problem(allow_quantized)


class ConvWithLoRA(LayerWithLoRA):
    """A frozen `nn.Conv1d`, `nn.Conv2d` or `nn.Conv3d` plus LoRA: A a convolution like the
    base's into `rank` channels, B a 1x1 convolution out of them (see the module doc)."""

    @property
    def channel_dim(self) -> int:
        """Before the spatial dimensions, counted from the end: (N, C, H, W) and unbatched (C, H, W) alike."""
        return -1 - len(self.base.kernel_size)

    def __init__(
        self,
        base: nn.Conv1d | nn.Conv2d | nn.Conv3d,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        lora_bias: bool = False,
        use_dora: bool = False,
    ) -> None:
        if not isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise TypeError(f"ConvWithLoRA wraps nn.Conv1d, nn.Conv2d and nn.Conv3d, got {type(base).__name__}")
        if use_dora and base.groups > 1:
            raise ValueError(
                f"DoRA on a grouped convolution (groups={base.groups}) is not defined here: the update spans all "
                "input channels while the kernel holds one group's, so W + delta W has no per-channel norm to "
                "take. Use plain LoRA on this layer, or leave it out of the targets"
            )
        kernel = math.prod(base.kernel_size)
        super().__init__(
            base, base.in_channels * kernel, base.out_channels, rank, alpha, dropout, use_rslora,
            lora_bias=lora_bias, use_dora=use_dora, groups=base.groups,
        )  # fmt: skip
        self._conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(base.kernel_size)]
        self.init_dora()

    def base_weight(self) -> torch.Tensor:
        return self.base.weight.float().reshape(self.out_features, -1)  # (out, in * kernel), groups == 1

    def _write_base_weight(self, weight: torch.Tensor) -> None:
        self.base.weight.copy_(weight.view_as(self.base.weight))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        base, lora = self.base, self.lora
        if x.dtype != lora.A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(lora.A.dtype)
        padding = base.padding
        if base.padding_mode != "zeros":  # as nn.Conv's own forward: pad first, then convolve unpadded
            x, padding = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode), 0
        a = lora.A.view(lora.rank, base.in_channels, *base.kernel_size)
        hidden = self._conv(x, a, None, base.stride, padding, base.dilation) * lora.scaling  # (N, rank, ...)
        b = lora.B.view(*lora.B.shape, *[1] * len(base.kernel_size))  # (out, rank / groups, 1, ...)
        bias = None if lora.bias is None else lora.bias * lora.scaling
        return self._conv(hidden, b, bias, 1, 0, 1, base.groups)

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self.base._conv_forward(x, self.base.weight.to(x.dtype), None)

    def merge_problem(self, allow_quantized: bool = False) -> str | None:
        if self.base.groups > 1:
            return (
                f"a grouped convolution (groups={self.base.groups}): the update connects every input channel to "
                "every output channel, which a grouped kernel cannot hold (PEFT cannot merge these either). Keep "
                "the adapter unmerged; it runs as it is"
            )
        return super().merge_problem(allow_quantized)


def _updated(lora: LoRALayer, weight: torch.Tensor) -> torch.Tensor:
    """W + delta W (or DoRA's g * (W + delta W), the norm detached), with the gradient to the adapter."""
    delta = lora.delta_weight()
    if lora.magnitude is None:
        return (weight.float() + delta).to(weight.dtype)
    scale = dora_scale(lora.magnitude, weight, delta)
    return (scale[:, None].float() * (weight.float() + delta)).to(weight.dtype)


class MultiheadAttentionWithLoRA(LayerWithLoRA):
    """A frozen `nn.MultiheadAttention` plus LoRA on its packed input projection (`lora`) and its
    output projection (`out_lora`); see the module doc. Attributes the base has (`batch_first`,
    `num_heads`, ...) read through, so `nn.TransformerEncoderLayer` keeps working around it."""

    def __init__(
        self,
        base: nn.MultiheadAttention,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        lora_bias: bool = False,
        use_dora: bool = False,
    ) -> None:
        if not base._qkv_same_embed_dim:
            raise ValueError(
                "nn.MultiheadAttention with kdim or vdim other than embed_dim keeps three separate projection "
                "weights; lora_lab (like PEFT) adapts the packed in_proj_weight only. Leave this module out"
            )
        if lora_bias:
            raise ValueError("lora_bias on nn.MultiheadAttention is not supported (PEFT ignores it for in_proj)")
        if not isinstance(base.out_proj, nn.Linear):
            raise TypeError(f"out_proj of this MultiheadAttention is {type(base.out_proj).__name__}, not nn.Linear")
        embed = base.embed_dim
        super().__init__(base, embed, 3 * embed, rank, alpha, 0.0, use_rslora, use_dora=use_dora)
        weight = base.out_proj.weight
        self.out_lora = LoRALayer(
            embed, embed, rank, alpha, 0.0, use_rslora, use_dora=use_dora, device=weight.device, dtype=self.lora.A.dtype
        )
        self._out_norm: torch.Tensor | None = None
        self.init_dora()

    def init_dora(self) -> None:
        """DoRA's magnitudes = ||W + delta W|| per row of in_proj_weight and of out_proj.weight."""
        if self.lora.magnitude is not None and self.lora.A.device.type != "meta":
            with torch.no_grad():
                for lora, weight in zip((self.lora, self.out_lora), self.merged_weights(), strict=True):
                    lora.magnitude.copy_(row_norm(weight.float() + lora.delta_weight()))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)

    def base_weight(self) -> torch.Tensor:
        return self.base.in_proj_weight.float()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.in_proj_weight

    def merged_weights(self) -> list[torch.Tensor]:
        return [self.base.in_proj_weight, self.base.out_proj.weight]

    def forward(self, *args, **kwargs):
        if self.runs_base():
            return self.base(*args, **kwargs)
        base = self.base
        weights = {
            "in_proj_weight": _updated(self.lora, base.in_proj_weight),
            "out_proj.weight": _updated(self.out_lora, base.out_proj.weight),
        }
        return functional_call(base, weights, args, kwargs)

    def merge_problem(self, allow_quantized: bool = False) -> str | None:
        for lora in (self.lora, self.out_lora):
            tensors = [lora.delta_weight()] + ([lora.magnitude] if lora.magnitude is not None else [])
            if lora.A.device.type != "meta" and not all(torch.isfinite(t).all() for t in tensors):
                return "the LoRA update has NaN or inf entries (the adapter diverged); merging would corrupt the base"
        return None

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged or not self.active:
            return
        problem = self.merge_problem()
        if problem is not None:
            raise ValueError(f"cannot merge LoRA: {problem}")
        norms = []
        for lora, weight in zip((self.lora, self.out_lora), self.merged_weights(), strict=True):
            delta = lora.delta_weight()
            if lora.magnitude is None:
                updated, norm = weight.float() + delta, None
            else:
                updated, norm = dora_weight(weight, delta, lora.magnitude)
            weight.copy_(updated)
            norms.append(norm)
        self._merged_norm, self._out_norm = norms
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        norms = (self._merged_norm, self._out_norm)
        for lora, weight, norm in zip((self.lora, self.out_lora), self.merged_weights(), norms, strict=True):
            delta = lora.delta_weight()
            if lora.magnitude is None:
                weight.copy_(weight.float() - delta)
            else:
                weight.copy_(undora_weight(weight, delta, lora.magnitude, norm))
        self.merged = False


KINDS: dict[type[nn.Module], type[LayerWithLoRA]] = {
    nn.Embedding: EmbeddingWithLoRA,
    nn.Conv1d: ConvWithLoRA,
    nn.Conv2d: ConvWithLoRA,
    nn.Conv3d: ConvWithLoRA,
    nn.MultiheadAttention: MultiheadAttentionWithLoRA,
}


def wrapper_class(module: nn.Module) -> type[LayerWithLoRA] | None:
    """The LoRA wrapper for `module`, or None if lora_lab does not adapt that kind of layer."""
    if linear_shape(module) is not None:
        return LinearWithLoRA
    for kind, wrapper in KINDS.items():
        if isinstance(module, kind):
            return wrapper
    return None


def update_width(module: nn.Module) -> int:
    """The largest rank an update of `module` (or of a wrapper's base) can have: min(in, out) in the linear layout."""
    module = module.base if isinstance(module, LayerWithLoRA) else module
    if isinstance(module, nn.Embedding):
        return min(module.num_embeddings, module.embedding_dim)
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return min(module.in_channels * math.prod(module.kernel_size), module.out_channels)
    return min(linear_shape(module))
