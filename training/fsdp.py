"""`--fsdp`: the model's weights sharded over the processes with PyTorch's FSDP2, for bases one GPU cannot hold.

Without it every process holds the whole model and only the trained parameters' gradients travel
(training/distributed.py). With it, `torch.distributed.fsdp.fully_shard` is applied to each repeated
block (FLUX's double and single blocks, SD3's joint blocks), then to the whole model for the rest, so
each process keeps 1/N of every weight, the frozen base's and the trained ones', and the optimizer
state of its share. A block's full weights are all-gathered just before its forward and again in the
backward, and freed after; the gradients of the trained parameters are reduce-scattered: averaged over
the processes into each one's shard, which replaces the loop's all-reduce (one average, never two).
Activation checkpointing is applied to the blocks before they are sharded, as torchtitan does.

The trained parameters and the optimizer state are DTensors then. Checkpoints and the LoRA file are
written from their full values, gathered one tensor at a time onto rank 0's CPU (`gathered`,
`full_parameters`): the same files as without FSDP, so a run resumes in either mode from the other's
checkpoint; resuming, each process takes its shard of the file's tensors (`shard_like`).

With FSDP the processes meet at every block (all-gathers, reduce-scatters), so a stop request must
abandon the step at the same block in every one: `any_process` is the vote training/interrupt.py takes
at each check, over a gloo group of its own (a CPU all-reduce of one number: no GPU synchronization).

Sources: PyTorch `torch.distributed.fsdp.fully_shard` and `torch.distributed.tensor` documentation;
torchtitan `torchtitan/models/llama3/infra/parallelize.py` (checkpointing, then blocks, then the root).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from sampling.offload import blocks_of

from . import distributed as dist

LAUNCH = ("--fsdp shards the model over the processes of torchrun: launch with `torchrun --nproc-per-node N "
          "-m training ...` (N >= 2); on one process leave --fsdp out")


def check_launch() -> None:
    """ValueError unless this process is one of several in a process group (torchrun's)."""
    if dist.world() < 2:
        raise ValueError(LAUNCH)


def shard(model: nn.Module, device: torch.device) -> None:
    """`fully_shard` each repeated block, then the model, over all processes; the weights move to `device`
    (a block at a time: the model may come from the CPU). ValueError if the model has no repeated blocks."""
    blocks = blocks_of(model)
    if not blocks:
        raise ValueError(f"--fsdp: {type(model).__name__} has no repeated blocks (an nn.ModuleList of layers) "
                         "to shard one by one; leave --fsdp out for this model")
    mesh = init_device_mesh(device.type, (dist.world(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def model_class(model: nn.Module) -> type:
    """The model's own class (`fully_shard` makes `model` an instance of a subclass, e.g. FSDPFlux)."""
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def full(t: Tensor) -> Tensor:
    """A DTensor's whole value on the CPU (a collective: every process calls it, in the same order);
    a plain tensor as it is."""
    return t.full_tensor().cpu() if isinstance(t, DTensor) else t


def gathered(params: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """The trained parameters and `optimizer.state_dict()` with full tensors, for a checkpoint. Every process
    calls it; under FSDP only rank 0's result holds the tensors (the others' are dropped one by one)."""
    keep = dist.rank() == 0

    def one(t):
        value = full(t.detach() if isinstance(t, Tensor) else t)
        return value if keep or not isinstance(t, DTensor) else None

    sd = optimizer.state_dict()
    state = {i: {k: one(v) for k, v in s.items()} for i, s in sd["state"].items()}
    return {k: one(p) for k, p in params.items()}, {**sd, "state": state}


def shard_like(value: Tensor, like: Tensor) -> Tensor:
    """`value` (a full tensor, the same in every process) as `like` is laid out: for a DTensor, this process's
    shard of it (no communication); else `value` itself."""
    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


@contextmanager
def full_parameters(model: nn.Module, names: list[str]) -> Iterator[None]:
    """The parameters `names` of `model` hold their full values (on the CPU, in every process) inside the
    block, for code that reads them from the model (`convert.save_lora`); their shards are put back after."""
    sharded = {}
    for name in names:
        owner, attr = _owner(model, name)
        p = owner._parameters[attr]
        if isinstance(p, DTensor):
            sharded[name] = p
            owner._parameters[attr] = nn.Parameter(full(p.detach()), requires_grad=False)
    try:
        yield
    finally:
        for name, p in sharded.items():
            owner, attr = _owner(model, name)
            owner._parameters[attr] = p


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def vote() -> Callable[[bool], bool]:
    """`any_process(flag)` over a new gloo group (every process must create it, and call it at the same points)."""
    group = torch_dist.new_group(backend="gloo")

    def any_process(flag: bool) -> bool:
        x = torch.tensor([float(flag)])
        torch_dist.all_reduce(x, group=group)
        return bool(x.item() > 0)

    return any_process
