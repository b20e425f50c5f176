"""The fused LoRA linear: ``x W^T + bias + scaling * (x A^T) B^T`` as one autograd node with the
gradients written out by hand, for a base weight that does not train. With h = x A^T and
g = dL/dy:

    dB = scaling * g^T h,   dA = scaling * (g B)^T x,   dx = g W + scaling * (g B) A

The branch is added into the base output, and its input gradient into the base's, in place
(`addmm_`), so no extra tensor of the output's or the input's size is made; the base's weight
gradient, which LoRA never needs, is never computed. `LinearWithLoRA` uses it where the helpers
below say nothing would be skipped (hooks, transforms) and falls back to its two modules elsewhere.
`linear_shape` says which layers are linear-like (what the node and `LinearWithLoRA` serve).
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def hf_conv1d() -> type | None:
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
    conv1d = hf_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.shape[0], module.nf
    return None


def plain_tensors(tensors, device: torch.device) -> bool:
    """Plain tensors or parameters (no subclass that overrides F.linear), all on `device`."""
    return all(type(t) in (torch.Tensor, nn.Parameter) and t.device == device for t in tensors)


def has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def global_hooks() -> bool:
    hooks = nn.modules.module
    return bool(
        hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


def transformed() -> bool:
    """True under torch.func transforms, forward-mode AD or TorchScript tracing."""
    functorch = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)()
    forward_ad = getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0
    return functorch or forward_ad or torch.jit.is_tracing()


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would compute a linear on `x` in, or None where it would not cast
    (autocast off; float64, which autocast leaves alone)."""
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(x.device.type):
        return None
    return torch.get_autocast_dtype(x.device.type)


class _LoRALinear(torch.autograd.Function):
    """``x W^T + bias + scaling * (xb A^T) B^T`` with W frozen; xb is x, or x after dropout."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, x_branch, dtype):
        ctx.dtypes = (x.dtype, A.dtype, B.dtype, None if x_branch is None else x_branch.dtype)
        # Under autocast everything is cast once here, as F.linear would, and the low-precision
        # copies are what backward reuses. Autocast is then off, so nothing is cast twice.
        with torch.autocast(x.device.type, enabled=False):
            if dtype is not None:
                x, weight, A, B = x.to(dtype), weight.to(dtype), A.to(dtype), B.to(dtype)
                bias = bias.to(dtype) if bias is not None else None
                x_branch = x_branch.to(dtype) if x_branch is not None else None
            xb = x if x_branch is None else x_branch
            x2 = x.reshape(-1, x.shape[-1])  # (N, in)
            h = xb.reshape(-1, xb.shape[-1]).mm(A.t())  # (N, rank)
            # The output is made here and filled in place: not a view, so callers may change it
            # in place (ReLU(inplace=True), out += residual) as they could the base's output.
            out = x.new_empty(*x.shape[:-1], weight.shape[0])
            flat = out.view(-1, weight.shape[0])  # (N, out)
            if bias is None:
                torch.mm(x2, weight.t(), out=flat)
            else:
                torch.addmm(bias, x2, weight.t(), out=flat)
            flat.addmm_(h, B.t(), alpha=scaling)
        need_x, _, _, need_A, need_B, _, need_xb, _ = ctx.needs_input_grad
        ctx.save_for_backward(
            weight if need_x else None,
            A if need_x or need_xb else None,
            B,
            h if need_B else None,
            xb if need_A else None,  # only what a gradient needs: the input may change in place later
        )
        ctx.scaling, ctx.separate_branch, ctx.in_features = scaling, x_branch is not None, x.shape[-1]
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "lora_lab's fused LoRA linear has a first-order backward only, and this backward asks for a "
                "graph of its own (create_graph=True: higher-order gradients, gradient penalties, MAML). Set "
                "LinearWithLoRA.fused = False (on the class, or on each layer) to differentiate twice"
            )
        weight, A, B, h, xb = ctx.saved_tensors
        need_x, _, _, need_A, need_B, _, need_xb, _ = ctx.needs_input_grad
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1]).to(B.dtype)  # (N, out)
        # The skinny products are written so that the long N side is the inner dimension of a
        # contiguous operand (B^T g^T rather than g B, h^T g rather than g^T h): 2-6x faster on
        # CPU BLAS for these shapes, the same numbers.
        gh_t = B.t().mm(g.t()).mul_(s) if need_x or need_xb or need_A else None  # (rank, N): (s g B)^T
        grad_x = grad_A = grad_B = grad_xb = None
        if need_A:
            grad_A = gh_t.mm(xb.reshape(-1, xb.shape[-1]))  # (rank, in)
        if need_B:
            grad_B = h.t().mm(g).mul_(s).t()  # (out, rank)
        lead = grad.shape[:-1]
        if need_x:
            grad_x = g.mm(weight)  # (N, in)
            if not ctx.separate_branch:
                grad_x.addmm_(gh_t.t(), A)
            grad_x = grad_x.view(*lead, ctx.in_features)
        if ctx.separate_branch and need_xb:
            grad_xb = gh_t.t().mm(A).view(*lead, ctx.in_features)
        # Each gradient in its input's dtype (fp32 A and B under autocast, whose copies were bf16).
        x_dtype, A_dtype, B_dtype, xb_dtype = ctx.dtypes
        return (
            None if grad_x is None else grad_x.to(x_dtype),
            None,
            None,
            None if grad_A is None else grad_A.to(A_dtype),
            None if grad_B is None else grad_B.to(B_dtype),
            None,
            None if grad_xb is None else grad_xb.to(xb_dtype),
            None,
        )


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    x_branch: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_branch, A), B)`` as one autograd
    node, for a `weight` and `bias` that do not train. `x_branch` defaults to `x` (no dropout)."""
    return _LoRALinear.apply(x, weight, bias, A, B, scaling, x_branch, autocast_dtype(x))
