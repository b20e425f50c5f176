"""The LoRA update itself: `LoRALayer` (the low-rank branch) and `LinearWithLoRA` (a frozen
linear-like layer plus that branch).

A linear layer computes ``y = x W^T + b`` with W of shape (out, in). LoRA learns a low-rank
change ``delta W = scaling * B @ A`` with A: (rank, in) and B: (out, rank), so that

    y = x W^T + b + scaling * (x A^T) B^T

B starts at zero, so a freshly wrapped model computes exactly what the base model computed.
The shapes, the initialisation and ``scaling = alpha / rank`` (``alpha / sqrt(rank)`` with
rsLoRA) follow microsoft/LoRA and Hugging Face PEFT, which lets adapters move between them.

In training, for a frozen `nn.Linear` or `Conv1D` base, the whole sum runs as one autograd node
with a hand-written backward (`fused.lora_linear`), where nothing that node cannot serve is in the way.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .fused import autocast_dtype, global_hooks, has_hooks, lora_linear, plain_tensors, transformed

QUANTIZED_WEIGHTS = {"Params4bit": "4-bit", "Int8Params": "8-bit"}  # bitsandbytes weight classes


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


def _hf_conv1d() -> type | None:
    # transformers' Conv1D (GPT-2's linears). Looked up only if transformers is already imported:
    # a module can only be one if it is, and importing transformers just to check costs a second.
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like module, or None if it is not one.

    Linear-like: `nn.Linear` and its subclasses (bitsandbytes `Linear4bit` / `Linear8bitLt`
    included) and transformers' `Conv1D`, whose weight is stored transposed as (in, out).
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    conv1d = _hf_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.shape[0], module.nf
    return None


def quantization(module: nn.Module) -> str | None:
    """'4-bit' or '8-bit' for a bitsandbytes-quantized linear, None for a plain one."""
    return QUANTIZED_WEIGHTS.get(type(getattr(module, "weight", None)).__name__)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear-like module as a plain (out, in) tensor, dequantizing bitsandbytes."""
    weight = module.weight
    kind = quantization(module)
    if kind == "4-bit" and getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place at its first
            # inference forward; undo that on copies (the inverse changes the state it is given).
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnbf.dequantize_4bit(data, state)
    if kind == "8-bit":
        # The row scales live on the weight until the first forward, then on the layer's state.
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = getattr(getattr(module, "state", None), "SCB", None)
        if scales is not None:
            import bitsandbytes.functional as bnbf

            return bnbf.int8_vectorwise_dequant(weight.data, scales)
    if linear_shape(module) is not None and not isinstance(module, nn.Linear):
        return weight.data.T  # Conv1D stores (in, out)
    return weight.data


class LoRALayer(nn.Module):
    """The low-rank branch ``x -> scaling * (dropout(x) A^T) B^T``.

    A is (rank, in), initialised kaiming-uniform (a = sqrt(5)) over its real fan-in `in`, the
    default of `nn.Linear`; B is (out, rank) and starts at zero.
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_rank(rank)
        check_alpha(alpha)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        # No dropout module at all when p = 0: nothing to run on the hot path.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.A.dtype)  # e.g. a bf16 model with fp32 adapters; autocast casts by itself
        if self.dropout is not None:
            x = self.dropout(x)
        # Scale the (..., rank) intermediate, the smallest tensor on the way.
        return F.linear(F.linear(x, self.A) * self.scaling, self.B)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, shaped (out, in) like `nn.Linear.weight`."""
        return (self.B.float() @ self.A.float()) * self.scaling

    def extra_repr(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, scaling={self.scaling:.4g}{rs}"
        )


class LinearWithLoRA(nn.Module):
    """A frozen linear-like layer (`base`) plus a trainable `LoRALayer` (`lora`).

    `base` may be `nn.Linear`, transformers' `Conv1D` or a bitsandbytes `Linear4bit` /
    `Linear8bitLt`; it is kept as it is (composition), so its own forward, quantized or not, runs
    unchanged and the LoRA branch is added to its output. Under autograd, a frozen plain
    `nn.Linear` or `Conv1D` base runs with its branch as one fused node (`lora_linear`) instead;
    set ``fused = False`` on a layer (or on the class) for the two separate modules.
    """

    fused = True

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        shape = linear_shape(base)
        if shape is None:
            raise TypeError(
                f"LinearWithLoRA wraps linear layers (nn.Linear, transformers Conv1D, bitsandbytes "
                f"Linear4bit/Linear8bitLt), got {type(base).__name__}"
            )
        weight = base.weight
        # Adapters train in fp32 (or fp64) whatever the base holds: half-precision or quantized
        # weights stay as they are, the small A and B keep full precision.
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora = LoRALayer(*shape, rank, alpha, dropout, use_rslora, device=weight.device, dtype=dtype)
        self.base = base.requires_grad_(False)  # after the checks above: a bad setting changes nothing
        # Without autograd (inference) the branch is added into the base output in place, so no
        # second output-sized tensor is allocated. Only for nn.Linear and Conv1D: a custom autograd
        # Function (bitsandbytes' 4-bit matmul) may return a view that must not be modified.
        self._plain_base = type(base) is nn.Linear or type(base) is _hf_conv1d()
        self.merged = False  # True while the update lives inside base.weight
        self.enabled = True  # False inside `disable_lora`

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

    def _fusable(self, x: torch.Tensor) -> bool:
        """Whether `lora_linear` computes exactly what base(x) + lora(x) would, and nothing the two
        modules would do is skipped: plain nn.Linear / Conv1D base and LoRALayer (a subclass may
        change its forward), base frozen, no hooks on either (nor global ones), no forward replaced
        on the instance (accelerate's offloading), plain tensors on the input's device, one dtype
        unless autocast decides, and no transform the hand-written backward cannot serve
        (torch.func, forward-mode AD, TorchScript tracing)."""
        base, lora = self.base, self.lora
        weight, bias = base.weight, getattr(base, "bias", None)
        tensors = (weight, lora.A, lora.B) if bias is None else (weight, bias, lora.A, lora.B)
        return (
            self.fused
            and self._plain_base
            and type(lora) is LoRALayer
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
        if self.merged or not self.enabled:
            return self.base(x)
        # The fused node pays off under autograd (one backward node, nothing extra saved); without
        # it, the two modules below add in place in about half the time per call on small inputs.
        if torch.is_grad_enabled() and self._fusable(x):
            lora, base = self.lora, self.base
            weight = base.weight.t() if self._is_conv1d() else base.weight  # (out, in)
            dropped = lora.dropout(x) if lora.dropout is not None and lora.dropout.training else None
            return lora_linear(x, weight, base.bias, lora.A, lora.B, lora.scaling, dropped)
        out = self.base(x)
        if self._plain_base and not torch.is_grad_enabled():
            return out.add_(self.lora(x))
        # Under autograd an ordinary add is faster: linear returns a view, and changing a view in
        # place routes its gradient through an extra copy (CopySlices): 5-16% per training step of
        # GPT-2 124M on an H200 (experiments/bench_lora.py).
        return out + self.lora(x).to(out.dtype)

    def _is_conv1d(self) -> bool:
        return not isinstance(self.base, nn.Linear)

    def merge_problem(self, allow_quantized: bool = False) -> str | None:
        """Why this layer cannot merge (a quantized base, a non-finite update), or None."""
        kind = quantization(self.base)
        if kind is not None and not allow_quantized:
            return (
                f"a {kind} bitsandbytes base: the merged weight W + BA would have to be quantized "
                "again, and that rounding is as large as the small update itself, so the merge would "
                "lose the adapter and unmerge could not restore W. Keep the adapter unmerged (it runs "
                "as it is), or call unload_lora(model), which dequantizes each base into a plain "
                "nn.Linear copy and merges there"
            )
        if self.lora.A.device.type != "meta" and not torch.isfinite(self.lora.delta_weight()).all():
            return (
                "the LoRA update B @ A has NaN or inf entries (the adapter diverged in training); "
                "merging would corrupt the base weights"
            )
        return None

    def _delta_in_base_layout(self) -> torch.Tensor:
        delta = self.lora.delta_weight()
        return delta.T if self._is_conv1d() else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into `base.weight` (in fp32), so the forward runs the base alone."""
        if self.merged:
            return
        problem = self.merge_problem()
        if problem is not None:
            raise ValueError(f"cannot merge LoRA: {problem}")
        weight = self.base.weight
        weight.copy_(weight.float() + self._delta_in_base_layout())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from `base.weight` again; a no-op when not merged."""
        if not self.merged:
            return
        weight = self.base.weight
        weight.copy_(weight.float() - self._delta_in_base_layout())
        self.merged = False

    @torch.no_grad()
    def unloaded(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A plain layer holding base + update: the base itself (merged in place), or for a
        quantized base a new `nn.Linear` with the dequantized weight in `dtype` (default: the
        layer's compute dtype, else fp32)."""
        if quantization(self.base) is None:
            self.merge()
            return self.base
        problem = self.merge_problem(allow_quantized=True)
        if problem is not None:
            raise ValueError(f"cannot unload LoRA: {problem}")
        weight = dequantized_weight(self.base)
        dtype = dtype or getattr(self.base, "compute_dtype", None) or torch.float32
        bias = self.base.bias
        plain = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device, dtype=dtype)
        plain.weight.copy_(weight.float() + self._delta_in_base_layout())
        if bias is not None:
            plain.bias.copy_(bias)
        return plain.requires_grad_(False)

    def extra_repr(self) -> str:
        return "merged" if self.merged else ""


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LinearWithLoRA]]:
    """The (qualified name, wrapper) pairs of every `LinearWithLoRA` in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LinearWithLoRA):
            yield name, module
