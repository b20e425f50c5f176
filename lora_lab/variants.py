"""How a LoRA update is applied beyond plain ``W + scaling * B A`` (DoRA), and how it starts (PiSSA, OLoRA).

DoRA (Liu et al. 2024) splits each output channel of the adapted weight into a direction and a
learned length. With W' = W + scaling * B A in the linear layout (out, in) and m a trainable
vector of one length per output channel, initialised to ``||W||`` row by row:

    W_dora = m / ||W'||_row * W'        (the norm over each row, taken detached)

so a freshly wrapped layer still computes W. Taking the norm detached is the paper's section 4.3
and PEFT's choice: its gradient is left out, which saves memory and changes little. In a forward
pass the layer computes ``g * (base(x) - bias) + g * lora(x) + bias`` with g = m / ||W'||, one
factor per output channel; merging writes W_dora into the base weight, unmerging divides g out.

These are tensor functions only: every layer kind (`lora.py`, `layers.py`) brings its weight in
the linear layout and the channel dimension of its output.
"""

from __future__ import annotations

import torch
from torch import nn


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row of an (out, in) weight, in fp32: DoRA's ||W||, shape (out,)."""
    return torch.linalg.norm(weight.float(), dim=1)


def dora_scale(magnitude: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """g = m / ||W + delta||_row for each output channel, the norm detached (no gradient through it).
    `weight` and `delta` are (out, in) in the linear layout; `delta` includes the scaling."""
    with torch.no_grad():
        norm = row_norm(weight.float() + delta.float())
    return magnitude / norm.to(magnitude.dtype)


def channel_view(values: torch.Tensor, out: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """`values` (one per channel) shaped to broadcast over `out` along `channel_dim` (counted from
    the end, so an unbatched input works too)."""
    shape = [1] * out.dim()
    shape[channel_dim] = -1
    return values.view(shape)


def dora_output(
    out: torch.Tensor, base_no_bias: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """DoRA's forward from the base output `out` (bias included), the base output without its bias
    (on the dropped-out input while dropout trains), the LoRA branch (scaling included) and g.

    out + (g - 1) * base_no_bias + g * branch; with no dropout this is g * (Wx + BAx) + bias. Summed in
    the adapter's precision and rounded to the base's once (a bf16 base with fp32 adapters), as PEFT."""
    return (out + (scale - 1) * base_no_bias + scale * branch).to(out.dtype)


def dora_weight(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the merged weight g * (W + delta), the norm ||W + delta|| that unmerging needs), fp32,
    linear layout."""
    updated = weight.float() + delta.float()
    norm = row_norm(updated)
    return (magnitude.float() / norm)[:, None] * updated, norm


def undora_weight(
    merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """W again from g * (W + delta), given the norm taken at merge time."""
    return merged.float() / (magnitude.float() / norm)[:, None] - delta.float()


# ---- how an adapter starts ----------------------------------------------------------------------
# kaiming: A kaiming-uniform, B zero (microsoft/LoRA, PEFT's default); gaussian: A normal with std
# 1/rank, B zero (PEFT's "gaussian"). Both leave the base alone, so the wrapped layer starts as it was.
# PiSSA (Meng et al. 2024) starts the adapter at the top-r singular directions of W and OLoRA (Büyükakyüz
# 2024) at the first r columns of its QR decomposition; both leave the residual W - scaling B A in the
# base, so the layer still starts as it was, but the base is no longer the original: an adapter saved
# from such a layer is converted first (`converted`), as PEFT does.
INITS = ("kaiming", "gaussian", "pissa", "olora")


def principal_init(weight: torch.Tensor, rank: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of PiSSA or OLoRA from W (out, in), fp32, as PEFT computes them:
    PiSSA: W = V S U^T, A = sqrt(S_r / scaling) U_r^T, B = V_r sqrt(S_r / scaling);
    OLoRA: W = Q R, A = R[:r], B = Q[:, :r]. The residual is W - scaling * B A."""
    weight = weight.float()
    if init == "pissa":
        V, S, Uh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(S[:rank] / scaling)
        return root[:, None] * Uh[:rank], V[:, :rank] * root[None, :]
    if init == "olora":
        Q, R = torch.linalg.qr(weight)
        return R[:rank].contiguous(), Q[:, :rank].contiguous()
    raise ValueError(f"unknown init {init!r}: use one of {INITS}")


def converted(
    A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """An adapter trained from (A0, B0) over the residual base, as a plain LoRA of rank 2r over the
    original base: scaling (B A - B0 A0) = scaling [B, -B0] [A; A0] (PEFT's conversion). Keep the
    scaling by doubling alpha (rsLoRA: times sqrt 2)."""
    return torch.cat([A, A0]), torch.cat([B, -B0], dim=1)


def start_adapter(wrapper, init: str) -> None:
    """Start a wrapper's adapter (a `LayerWithLoRA` over a linear) as `init` says; PiSSA / OLoRA
    also leave W - scaling B A in the base and keep (A0, B0) (buffers, not saved) for `converted`."""
    lora = wrapper.lora
    if lora.A.device.type == "meta":
        return
    with torch.no_grad():
        if init == "gaussian":  # every branch (attention has two); an embedding keeps A = 0, B normal, as PEFT
            if getattr(wrapper.base, "embedding_dim", None) is None:
                for branch in (lora, getattr(wrapper, "out_lora", None)):
                    if branch is not None:
                        nn.init.normal_(branch.A, std=1 / branch.rank)
            return
        weight = wrapper.base_weight()
        A, B = principal_init(weight, lora.rank, lora.scaling, init)
        lora.A.copy_(A)
        lora.B.copy_(B)
        wrapper._write_base_weight(weight - lora.scaling * (B @ A))
    lora.register_buffer("A0", lora.A.detach().clone(), persistent=False)
    lora.register_buffer("B0", lora.B.detach().clone(), persistent=False)
