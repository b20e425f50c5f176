"""Several processes on one job, in one place: torchrun's process group, which device a process
takes, and the sums and minima the training loop needs over processes. Without a group every
function is the one-process answer, so the rest of the code never asks whether it is distributed."""

from __future__ import annotations

import os

import torch


def world() -> tuple[int, int]:
    """(rank, world size) of this process in a torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group once, NCCL when the processes train on
    GPUs, gloo on CPUs. Returns (rank, world size)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        on_gpu = torch.cuda.is_available() and not str(device).startswith("cpu")
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return world()


def barrier() -> None:
    """Wait for every process of the group (nothing without one)."""
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


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
