"""What an adapter file changes, as the factors of its update dW = scaling * B A per module in the
linear layout (out, in): what `analyze.py` takes spectra and subspaces of. Read from the file alone,
except DoRA's, whose rescaling of W needs the base weights."""

from __future__ import annotations

import json
import math
import os
import warnings

import torch
from torch import nn

from .files import read_safetensors


def update_factors(
    path: str | os.PathLike, base: nn.Module | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """What an adapter file changes, as {module name: (A, B, scaling)} with dW = scaling * B A in the
    linear layout: a grouped convolution's B (out, rank / groups) comes back block-diagonal
    (out, rank); an attention module's output projection is its own entry, ``<name>.out_proj``.

    DoRA's update also rescales every output channel of W, so it is not B A alone: with the `base`
    model it is taken whole, dW = m / ||W + s B A|| * (W + s B A) - W, and given by its top `rank`
    singular directions (A = V_r^T, B = U_r S_r, scaling 1); without a base, as scaling * B A with a
    warning."""
    tensors, metadata = read_safetensors(path, "run the sweep again to write it")
    modules = json.loads(metadata.get("lora_lab", "{}")).get("modules", {})
    dora = [name for name, spec in modules.items() if spec.get("use_dora")]
    if dora and base is None:
        warnings.warn(
            f"{path}: {len(dora)} DoRA module(s): their spectra are of scaling * B A, the direction update; the "
            "magnitude's rescaling (m / ||W + scaling B A||) needs the base weights and is not in them",
            stacklevel=2,
        )
    out = {}
    for name, spec in modules.items():
        scaling = spec["alpha"] / (math.sqrt(spec["rank"]) if spec.get("use_rslora") else spec["rank"])
        for branch, key in (("lora", name), ("out_lora", f"{name}.out_proj")):
            if f"{name}.{branch}.A" not in tensors:
                continue
            a, b = (
                tensors[f"{name}.{branch}.A"],
                _dense_b(tensors[f"{name}.{branch}.B"], tensors[f"{name}.{branch}.A"].shape[0]),
            )
            magnitude = tensors.get(f"{name}.{branch}.magnitude")
            if magnitude is not None and base is not None:
                a, b, scaling = _dora_update(base_weight(base, key), a, b, scaling, magnitude)
            out[key] = (a, b, scaling)
    return out


def base_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight of module `name` of an unwrapped `model` in the linear layout (out, in), fp64;
    ``<attention>`` is its in_proj_weight, ``<attention>.out_proj`` its output projection."""
    module = model.get_submodule(name)
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight.detach().double()
    weight = module.weight.detach().double()
    if isinstance(module, nn.Embedding) or (weight.dim() == 2 and not isinstance(module, nn.Linear)):
        return weight.T  # an embedding's rows, transformers' Conv1D (in, out)
    return weight.reshape(weight.shape[0], -1)  # a linear, or a convolution's kernel flattened


def _dora_update(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, magnitude: torch.Tensor):
    """DoRA's whole update m / ||W + s B A|| * (W + s B A) - W as its top-r factors (A, B, 1)."""
    updated = weight + scaling * b.double() @ a.double()
    delta = (magnitude.double() / torch.linalg.norm(updated, dim=1))[:, None] * updated - weight
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = a.shape[0]
    return vh[:r], u[:, :r] * s[:r], 1.0


def _dense_b(b: torch.Tensor, rank: int) -> torch.Tensor:
    """B (out, rank / groups) of a grouped convolution as the block-diagonal (out, rank) it stands for."""
    groups = rank // b.shape[1]
    if groups == 1:
        return b
    out = torch.zeros(b.shape[0], rank, dtype=b.dtype)
    rows, cols = b.shape[0] // groups, b.shape[1]
    for g in range(groups):
        out[g * rows : (g + 1) * rows, g * cols : (g + 1) * cols] = b[g * rows : (g + 1) * rows]
    return out
