"""The few torch.distributed calls training needs, each a no-op in a single process.

Data parallelism over the LoRA parameters only: every process holds the frozen base model, runs its
share of the global batch, and the LoRA gradients are averaged with one all-reduce per optimizer step
(the frozen weights are never communicated, unlike a DistributedDataParallel wrapper, which
broadcasts every parameter at start). Launch with `torchrun --nproc-per-node N -m training ...`;
the backend is NCCL on CUDA devices and gloo on the CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def init_from_env(device_type: str) -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment), if not joined yet."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(x: Tensor) -> Tensor:
    """The element-wise sum over processes (in place, returned)."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def average_gradients(params: list[Tensor]) -> None:
    """Every process ends with the mean of the processes' gradients (one flat all-reduce)."""
    n = world()
    if n == 1:
        return
    grads = [p.grad for p in params]
    flat = all_sum(torch.cat([g.flatten() for g in grads])) / n
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def broadcast_(params: list[Tensor]) -> None:
    """Rank 0's values everywhere (the LoRA initialization)."""
    if dist.is_initialized():
        for p in params:
            dist.broadcast(p.data, 0)
