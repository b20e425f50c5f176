"""Several processes on one job, in one place: torchrun's process group, which device a process
takes, and the sums and minima the training loop needs over processes. Without a group every
function is the one-process answer, so the rest of the code never asks whether it is distributed."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size) of this process in a torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group once, NCCL when the processes train on
    GPUs, gloo on CPUs; on GPUs each process makes its own the current device (NCCL's collectives and
    FSDP's shards go to the current device). Returns (rank, world size)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        on_gpu = torch.cuda.is_available() and not str(device).startswith("cpu")
        if on_gpu and device_for(device).index is not None:  # torchrun's LOCAL_RANK (else the one GPU it sees)
            torch.cuda.set_device(device_for(device))
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return world()


def barrier() -> None:
    """Wait for every process of the group (nothing without one)."""
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def leave() -> None:
    """Every process done: leave the group together (a process that ends while another still talks to
    it can abort the job at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device_for(name: str) -> torch.device:
    """The device a process computes on: "auto" is a GPU when there is one, else the CPU; under
    torchrun ("auto" or "cuda") each process takes the GPU of its LOCAL_RANK, one GPU per process,
    whether the processes train one run together (DDP) or points of a sweep apart."""
    local = os.environ.get("LOCAL_RANK")
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name in ("auto", "cuda") and local is not None:
        return torch.device(f"cuda:{local}")
    return torch.device("cuda" if name == "auto" else name)


def sum_over_processes(values: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """`values` added over the `size` processes of the group (returned on the CPU)."""
    if size == 1:
        return values
    import torch.distributed as dist

    on_device = values.to(device)
    dist.all_reduce(on_device)
    return on_device.cpu()


def all_processes(flag: bool, size: int, device: torch.device) -> bool:
    """Whether `flag` holds on every process (each process learns the same answer)."""
    if size == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


# ---- FSDP2: the model sharded over the processes ---------------------------------------------------


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the classes Hugging Face names in `_no_split_modules`, else the
    longest list of modules of one class (GPTModel's `trf_blocks`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList | torch.nn.Sequential) and len(m) > 1
             and len({type(c) for c in m}) == 1]  # fmt: skip
    return list(max(lists, key=len)) if lists else []


def shard_model(model: nn.Module, bf16: bool = False, device: torch.device | str = "cpu") -> int:
    """Shard `model` in place over the process group with FSDP2 (`fully_shard`): each transformer block
    its own unit (gathered for its forward and backward, then freed), then the root. The frozen base
    and LoRA are both sharded; gradients are reduce-scattered, averaged as DDP averages them. The shards
    live on `device` (this process's): a model loaded on the CPU goes there a block at a time, never
    whole. With `bf16`, parameters compute in bfloat16 (the frozen base is stored so: the values the
    cast would give) and gradients reduce in float32; trainable tensors stay fp32. A bitsandbytes
    4-bit weight shards as its uint8 codes (never cast); its absmax stays whole on the layer. Returns
    the number of blocks sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"--fsdp: no transformer blocks found in {type(model).__name__} to shard one by one")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs: dict = {"mesh": init_device_mesh(torch.device(device).type, (world()[1],))}
    if policy is not None:
        kwargs["mp_policy"] = policy
        for param in model.parameters():  # the frozen base kept in the bf16 it computes in: half the bytes
            if not param.requires_grad and param.dtype == torch.float32:
                param.data = param.data.to(torch.bfloat16)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return len(blocks)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is sharded with FSDP2, its parameters put back as shards (after a forward with no
    backward, an evaluation, the root's stay gathered: `named_parameters` would not name the shards the
    optimizer holds)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.reshard()
    return bool(units)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors, whole, on the CPU (under FSDP the shards gathered: every process
    calls this, and each gets them all)."""
    is_sharded(model)  # the shards in place
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
            for n, p in model.named_parameters() if p.requires_grad}  # fmt: skip


@torch.no_grad()
def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`trainable_state`'s tensors back into the model: under FSDP each process copies its own rows."""
    is_sharded(model)
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        param = params[name]
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            tensor = distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements)
        param.copy_(tensor)


@contextlib.contextmanager
def whole_trainable(model: nn.Module) -> Iterator[None]:
    """Under FSDP: the trainable tensors (LoRA, a head; small) gathered whole, every process taking
    part, and on rank 0 put in their shards' place while the block runs (to save the adapter). The
    frozen base stays sharded: it is never gathered. Without shards, nothing happens."""
    whole = trainable_state(model) if is_sharded(model) else {}  # under FSDP every parameter is a shard
    swapped = []
    if whole and world()[0] == 0:
        for name, tensor in whole.items():
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            swapped.append((module, leaf, module._parameters[leaf]))
            module._parameters[leaf] = torch.nn.Parameter(tensor)
    try:
        yield
    finally:
        for module, leaf, shard in swapped:
            module._parameters[leaf] = shard
