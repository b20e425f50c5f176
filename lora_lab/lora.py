"""The LoRA update itself: `LoRALayer` (the low-rank branch) and `LinearWithLoRA` (a frozen
linear-like layer plus that branch).

A linear layer computes ``y = x W^T + b`` with W of shape (out, in). LoRA learns a low-rank
change ``delta W = scaling * B @ A`` with A: (rank, in) and B: (out, rank), so that

    y = x W^T + b + scaling * (x A^T) B^T

B starts at zero, so a freshly wrapped model computes exactly what the base model computed.
The shapes, the initialisation and ``scaling = alpha / rank`` (``alpha / sqrt(rank)`` with
rsLoRA) follow microsoft/LoRA and Hugging Face PEFT, which lets adapters move between them.

`LayerWithLoRA` is what every layer kind shares: a frozen base, its LoRA branch, merge, unmerge,
unload, disable. A kind says where its weight lives and how its branch runs (`LinearWithLoRA`
here; embeddings, convolutions and attention in `layers.py`); a variant changes how the update
is applied (DoRA, `variants.py`), not the kind. Every kind sees its weight in the linear layout
(out, in), so one ``delta W = scaling * B A`` serves them all.

In training, for a frozen `nn.Linear` or `Conv1D` base, the whole sum runs as one autograd node
with a hand-written backward (`fused.lora_linear`), where nothing that node cannot serve is in the way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .fused import (
    autocast_dtype,
    global_hooks,
    has_hooks,
    hf_conv1d,
    linear_shape,
    lora_linear,
    plain_tensors,
    transformed,
)
from .quantize import dequantized_weight, quantization, why_not_merge_quantized
from .variants import channel_view, dora_output, dora_scale, dora_weight, row_norm, undora_weight


def check_rank(rank: object, what: str = "rank") -> int:
    """Return `rank` if it is a positive integer, else raise a ValueError that says why."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(
            f"{what} must be a positive integer, got {rank!r}: LoRA learns an update B @ A of "
            "that rank, so use r >= 1 (4 to 64 is typical)"
        )
    return rank


def check_alpha(alpha: object, what: str = "alpha") -> float:
    """Return `alpha` if it is a positive number, else raise a ValueError that says why."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(
            f"{what} must be a positive number, got {alpha!r}: the update is scaled by "
            "alpha / rank, so alpha = rank or 2 * rank is the usual choice"
        )
    return alpha


class LoRALayer(nn.Module):
    """The low-rank branch ``x -> scaling * (dropout(x) A^T) B^T`` and its trainable tensors.

    A is (rank, in), initialised kaiming-uniform (a = sqrt(5)) over its real fan-in `in`, the
    default of `nn.Linear`; B is (out, rank) and starts at zero. Optional, as in PEFT: `bias`, a
    trainable bias on B (``lora_bias``), and `magnitude`, DoRA's length of each output channel
    (set from the base weight by the layer). With ``groups`` > 1 (a grouped convolution) B is
    (out, rank / groups): output group g reads its own slice of the rank.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        bias: bool = False,
        use_dora: bool = False,
        groups: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_rank(rank)
        check_alpha(alpha)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if rank % groups:
            raise ValueError(
                f"rank {rank} is not a multiple of the layer's groups={groups}: each group of output channels "
                f"gets rank / groups directions, so use a rank divisible by {groups}"
            )
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank // groups, device=device, dtype=dtype))
        for name, wanted in (("bias", bias), ("magnitude", use_dora)):
            vector = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if wanted else None
            self.register_parameter(name, vector)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        # No dropout module at all when p = 0: nothing to run on the hot path.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        return self.project(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The branch without dropout: ``scaling * (x A^T) B^T`` (+ scaling * bias)."""
        if x.dtype != self.A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.A.dtype)  # e.g. a bf16 model with fp32 adapters; autocast casts by itself
        # Scale the (..., rank) intermediate, the smallest tensor on the way.
        bias = None if self.bias is None else self.bias * self.scaling
        return F.linear(F.linear(x, self.A) * self.scaling, self.B, bias)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, shaped (out, in) like `nn.Linear.weight`."""
        B, A = self.B.float(), self.A.float()
        if self.groups == 1:
            return (B @ A) * self.scaling
        g = self.groups  # output group i uses rows i of B and rank slice i of A
        blocks = B.view(g, self.out_features // g, -1) @ A.view(g, self.rank // g, self.in_features)
        return blocks.reshape(self.out_features, self.in_features) * self.scaling

    def extra_repr(self) -> str:
        on = {"rslora": self.use_rslora, "bias": self.bias is not None, "dora": self.magnitude is not None}
        extras = [n for n, v in on.items() if v] + ([f"groups={self.groups}"] if self.groups > 1 else [])
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, " + ", ".join(
            [f"scaling={self.scaling:.4g}", *extras]
        )


class LayerWithLoRA(nn.Module):
    """A frozen layer (`base`) plus a trainable `LoRALayer` (`lora`): what every layer kind shares.

    A kind (a subclass) says where its weight lives (`base_weight`, `_write_base_weight`, both in
    the linear layout (out, in)), how its branch runs (`branch`) and which output dimension holds
    the channels. The base is kept as it is (composition): its own forward runs unchanged and the
    branch is added to its output. With DoRA (``use_dora``) the output is rescaled per channel.
    """

    channel_dim = -1  # where the output channels are: last for linears and embeddings, 1 for convolutions

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        lora_bias: bool = False,
        use_dora: bool = False,
        groups: int = 1,
    ) -> None:
        super().__init__()
        if lora_bias and use_dora:
            raise ValueError("lora_bias and use_dora do not go together (PEFT refuses them too): choose one")
        weight = base.weight if hasattr(base, "weight") else next(base.parameters())  # MHA: in_proj_weight
        # Adapters train in fp32 (or fp64) whatever the base holds: half-precision or quantized
        # weights stay as they are, the small A and B keep full precision.
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora = LoRALayer(
            in_features, out_features, rank, alpha, dropout, use_rslora,
            bias=lora_bias, use_dora=use_dora, groups=groups, device=weight.device, dtype=dtype,
        )  # fmt: skip
        self.base = base.requires_grad_(False)  # after the checks above: a bad setting changes nothing
        self.merged = False  # True while the update lives inside base.weight
        self.enabled = True  # False inside `disable_lora`
        # Several named adapters (`named_adapters.py`): the one in use is `lora`, the others wait in
        # `others`, frozen. Where the model's active adapter is one this layer lacks, it runs its base.
        self.adapter_name, self.others, self.active = "default", nn.ModuleDict(), True
        self._merged_norm: torch.Tensor | None = None  # DoRA's ||W + delta W|| at merge time

    def init_dora(self) -> None:
        """Set DoRA's magnitude to ||W + delta W|| per output channel, so the layer starts as its base."""
        if self.lora.magnitude is not None and self.lora.A.device.type != "meta":
            with torch.no_grad():
                norm = row_norm(self.base_weight() + self.lora.delta_weight())
                self.lora.magnitude.copy_(norm)

    @property
    def in_features(self) -> int:
        return self.lora.in_features

    @property
    def out_features(self) -> int:
        return self.lora.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, so code that reads `layer.weight` keeps working."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def merged_weights(self) -> list[torch.Tensor]:
        """The base tensors that merging writes (what must not be shared with another module)."""
        return [self.base.weight] + ([self.bias] if self.lora.bias is not None else [])

    # ---- what a layer kind says ----------------------------------------------------------------

    def base_weight(self) -> torch.Tensor:
        """The base weight in the linear layout (out, in), fp32."""
        return self.base.weight.float()

    def _write_base_weight(self, weight: torch.Tensor) -> None:
        """Store `weight` (linear layout, fp32) as the base weight, in the base's layout and dtype."""
        self.base.weight.copy_(weight)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA branch on an input that dropout already saw, scaling (and lora bias) included."""
        return self.lora.project(x)

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The base's output without its bias, for DoRA on a dropped-out input."""
        return F.linear(x, self.base_weight().to(x.dtype))

    # ---- shared by every kind ------------------------------------------------------------------

    def runs_base(self) -> bool:
        """Whether the forward is the base's alone: merged, disabled, or without the active adapter."""
        return self.merged or not (self.enabled and self.active)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_base():
            return self.base(x)
        out = self.base(x)
        dropout = self.lora.dropout
        dropped = dropout(x) if dropout is not None and dropout.training else x
        branch = self.branch(dropped)
        if self.lora.magnitude is None:
            return (out + branch).to(out.dtype)  # summed in the adapter's precision, rounded once (as PEFT)
        with torch.no_grad():  # the norm is taken detached: no graph for B A here
            delta = self.lora.delta_weight()
        scale = channel_view(dora_scale(self.lora.magnitude, self.base_weight(), delta), out, self.channel_dim)
        if dropped is not x:  # PEFT's rule: on a dropped-out input the base term is computed again
            base = self.base_without_bias(dropped)
        else:
            bias = self.bias
            base = out if bias is None else out - channel_view(bias, out, self.channel_dim)
        return dora_output(out, base, branch, scale)

    def merge_problem(self, allow_quantized: bool = False) -> str | None:
        """Why this layer cannot merge (a quantized base, a non-finite update...), or None."""
        kind = quantization(self.base)
        if kind is not None and not allow_quantized:
            return why_not_merge_quantized(kind)
        if self.lora.bias is not None and self.bias is None:
            return "the adapter has a LoRA bias (lora_bias) and the base layer has no bias to merge it into"
        if "weight" not in self.base._parameters:
            return (
                "the base weight is computed (a parametrization such as weight_norm, or a hook), not stored, so a "
                "merge could not write it; keep the adapter unmerged, it runs as it is"
            )
        tensors = [t for t in (self.lora.bias, self.lora.magnitude) if t is not None]
        if self.lora.A.device.type != "meta" and not all(
            torch.isfinite(t).all() for t in [self.lora.delta_weight(), *tensors]
        ):
            return (
                "the LoRA update B @ A has NaN or inf entries (the adapter diverged in training); "
                "merging would corrupt the base weights"
            )
        return None

    @torch.no_grad()
    def merge(self) -> None:
        """Put the update into the base weight (in fp32), so the forward runs the base alone. A layer
        without the model's active adapter has none to merge."""
        if self.merged or not self.active:
            return
        problem = self.merge_problem()
        if problem is not None:
            raise ValueError(f"cannot merge LoRA: {problem}")
        merged, self._merged_norm = self.updated_weight()
        self._write_base_weight(merged)
        if self.lora.bias is not None:
            self.bias.add_((self.lora.bias * self.lora.scaling).to(self.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def updated_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W + delta W, or DoRA's g * (W + delta W); DoRA's norm or None), fp32, linear layout."""
        weight, delta = self.base_weight(), self.lora.delta_weight()
        if self.lora.magnitude is None:
            return weight + delta, None
        return dora_weight(weight, delta, self.lora.magnitude)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again; a no-op when not merged."""
        if not self.merged:
            return
        weight, delta, magnitude = self.base_weight(), self.lora.delta_weight(), self.lora.magnitude
        if magnitude is None:
            self._write_base_weight(weight - delta)
        else:
            self._write_base_weight(undora_weight(weight, delta, magnitude, self._merged_norm))
        if self.lora.bias is not None:
            self.bias.sub_((self.lora.bias * self.lora.scaling).to(self.bias.dtype))
        self.merged = False

    @torch.no_grad()
    def unloaded(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A plain layer holding base + update: the base itself, merged in place."""
        self.merge()
        return self.base

    def extra_repr(self) -> str:
        return "merged" if self.merged else ""


class LinearWithLoRA(LayerWithLoRA):
    """A frozen linear-like layer plus LoRA.

    `base` may be `nn.Linear`, transformers' `Conv1D` or a bitsandbytes `Linear4bit` /
    `Linear8bitLt`; its own forward, quantized or not, runs unchanged. Under autograd, a frozen
    plain `nn.Linear` or `Conv1D` base with plain LoRA runs with its branch as one fused node
    (`lora_linear`) instead; set ``fused = False`` on a layer (or on the class) for the two modules.
    """

    fused = True

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        lora_bias: bool = False,
        use_dora: bool = False,
    ) -> None:
        shape = linear_shape(base)
        if shape is None:
            raise TypeError(
                f"LinearWithLoRA wraps linear layers (nn.Linear, transformers Conv1D, bitsandbytes "
                f"Linear4bit/Linear8bitLt), got {type(base).__name__}"
            )
        super().__init__(base, *shape, rank, alpha, dropout, use_rslora, lora_bias=lora_bias, use_dora=use_dora)
        # Without autograd (inference) the branch is added into the base output in place, so no
        # second output-sized tensor is allocated. Only for nn.Linear and Conv1D: a custom autograd
        # Function (bitsandbytes' 4-bit matmul) may return a view that must not be modified.
        self._plain_base = type(base) is nn.Linear or type(base) is hf_conv1d()
        self.init_dora()

    def base_weight(self) -> torch.Tensor:
        weight = dequantized_weight(self.base).float()
        return weight.T if self._is_conv1d() else weight  # Conv1D stores (in, out)

    def _write_base_weight(self, weight: torch.Tensor) -> None:
        self.base.weight.copy_(weight.T if self._is_conv1d() else weight)

    def _fusable(self, x: torch.Tensor) -> bool:
        """Whether `lora_linear` computes exactly what base(x) + lora(x) would, skipping nothing: plain
        nn.Linear / Conv1D base and plain LoRALayer (no subclass, DoRA or lora bias), base frozen, no hooks
        (nor global ones), no forward replaced on the instance (accelerate's offloading), plain tensors on
        the input's device, one dtype unless autocast decides, no torch.func / forward AD / tracing."""
        base, lora = self.base, self.lora
        weight, bias = base.weight, getattr(base, "bias", None)
        tensors = (weight, lora.A, lora.B) if bias is None else (weight, bias, lora.A, lora.B)
        return (
            self.fused
            and self._plain_base
            and type(lora) is LoRALayer
            and lora.bias is None
            and lora.magnitude is None
            and not x.is_nested  # nn.TransformerEncoder's fast path in eval
            and type(x) is torch.Tensor
            and plain_tensors(tensors, x.device)
            and x.device.type != "meta"
            and not weight.requires_grad
            and (bias is None or (not bias.requires_grad and bias.dtype == weight.dtype))
            and not any(has_hooks(m) for m in (base, lora))
            and not global_hooks()
            and not any("forward" in vars(m) or hasattr(m, "_hf_hook") for m in (base, lora))
            and (autocast_dtype(x) is not None or x.dtype == weight.dtype == lora.A.dtype == lora.B.dtype)
            and not transformed()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_base():
            return self.base(x)
        # The fused node pays off under autograd (one backward node, nothing extra saved); without
        # it, the two modules below add in place in about half the time per call on small inputs.
        if torch.is_grad_enabled() and self._fusable(x):
            lora, base = self.lora, self.base
            weight = base.weight.t() if self._is_conv1d() else base.weight  # (out, in)
            dropped = lora.dropout(x) if lora.dropout is not None and lora.dropout.training else None
            return lora_linear(x, weight, base.bias, lora.A, lora.B, lora.scaling, dropped)
        if self.lora.magnitude is not None:
            return super().forward(x)
        out = self.base(x)
        if self._plain_base and not torch.is_grad_enabled():
            return out.add_(self.lora(x))
        # Under autograd an ordinary add is faster: linear returns a view, and changing a view in
        # place routes its gradient through an extra copy (CopySlices): 5-16% per training step of
        # GPT-2 124M on an H200 (experiments/bench_lora.py). A bf16 base with fp32 adapters sums in fp32
        # and rounds once, as PEFT and the in-place path above do.
        return (out + self.lora(x)).to(out.dtype)

    def _is_conv1d(self) -> bool:
        return not isinstance(self.base, nn.Linear)

    @torch.no_grad()
    def unloaded(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A plain layer holding base + update: the base itself (merged in place), or for a
        quantized base a new `nn.Linear` with the dequantized weight in `dtype` (default: the
        layer's compute dtype, else fp32)."""
        if quantization(self.base) is None or not self.active:
            return super().unloaded(dtype)
        problem = self.merge_problem(allow_quantized=True)
        if problem is not None:
            raise ValueError(f"cannot unload LoRA: {problem}")
        weight, _ = self.updated_weight()
        dtype = dtype or getattr(self.base, "compute_dtype", None) or torch.float32
        bias = self.base.bias
        plain = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device, dtype=dtype)
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias if self.lora.bias is None else bias + self.lora.bias * self.lora.scaling)
        return plain.requires_grad_(False)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LayerWithLoRA]]:
    """The (qualified name, wrapper) pairs of every LoRA-wrapped layer in `model`, of any kind."""
    for name, module in model.named_modules():
        if isinstance(module, LayerWithLoRA):
            yield name, module
