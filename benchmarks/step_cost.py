"""What one eager step asks of a GPU, counted on the meta device: no memory, no GPU, a few seconds on a CPU.

`step_cost(step)` runs `step()` (a model call on meta tensors) under a dispatch mode that counts every
kernel, the FLOPs of the matmuls (linear layers, convolutions) and of attention, and the bytes read and
written by every other op (elementwise, norms, casts, copies, concatenations). Views are free.
`F.scaled_dot_product_attention` and `F.rms_norm` count as the single fused kernels they are on CUDA
(flash attention; `aten::_fused_rms_norm`), so the model sees what an H100 runs, not their CPU
decompositions. `StepCost.ideal_ms` turns the counts into a floor: the matmuls at the H100's dense bf16
peak plus the other bytes at its full bandwidth, with no overlap and no launch cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

VIEW_OPS = {  # no data moves (views, and allocations without a fill)
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze",
    "split", "split_with_sizes", "chunk", "unbind", "as_strided", "detach", "alias", "narrow", "unflatten",
    "view_as_real", "view_as_complex", "_reshape_alias", "lift_fresh",
    "empty", "empty_strided", "empty_like", "new_empty",
}
H100 = {"flop/s": 790e12, "byte/s": 3.35e12}  # H100 SXM: dense bf16 peak, HBM3 bandwidth


@dataclass
class StepCost:
    """What one eager step asks of a GPU: launches, matmul work, and the bytes every other op reads and writes."""

    kernels: int = 0
    gemm_flop: float = 0.0  # linear layers and the patch convolution
    attention_flop: float = 0.0  # 4 B H Lq Lk D per SDPA call
    other_bytes: float = 0.0  # elementwise, norms, copies, casts, concatenations; attention's q, k, v, out

    def ideal_ms(self) -> float:
        """Matmuls at peak FLOP/s plus the rest at full bandwidth (no overlap, no launch cost): a floor."""
        flop = (self.gemm_flop + self.attention_flop) / H100["flop/s"]
        return 1e3 * (flop + self.other_bytes / H100["byte/s"])


def _nbytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, Tensor))


class _Counting(TorchDispatchMode):
    def __init__(self, cost: StepCost):
        super().__init__()
        self.cost = cost

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name, c = func.overloadpacket.__name__, self.cost
        if name in VIEW_OPS:
            return out
        c.kernels += 1
        if name in ("mm", "addmm"):  # (M, K) @ (K, N): the last two arguments
            c.gemm_flop += 2 * args[-2].numel() * args[-1].shape[-1]
        elif name == "convolution":
            w = args[1]
            c.gemm_flop += 2 * out.numel() * w[0].numel()
        else:
            c.other_bytes += _nbytes(args) + _nbytes(out)
        return out


@contextmanager
def _fused_ops_counted(cost: StepCost) -> Iterator[None]:
    """SDPA and F.rms_norm as the single fused kernels they are on CUDA (flash attention, `_fused_rms_norm`)."""
    sdpa, rms = F.scaled_dot_product_attention, F.rms_norm

    def attention(query: Tensor, key: Tensor, value: Tensor, *args, **kwargs) -> Tensor:
        B, H, Lq, D = query.shape
        cost.kernels += 1
        cost.attention_flop += 4 * B * H * Lq * key.shape[-2] * D
        cost.other_bytes += _nbytes((query, key, value)) + _nbytes(query)  # the output is q-sized
        return query.new_empty(B, Lq, H, value.shape[-1]).transpose(1, 2)  # flash's output layout

    def rms_norm(x: Tensor, *args, **kwargs) -> Tensor:
        cost.kernels += 1
        cost.other_bytes += 2 * _nbytes(x)
        return torch.empty_like(x)

    F.scaled_dot_product_attention, F.rms_norm = attention, rms_norm
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.rms_norm = sdpa, rms


@torch.no_grad()
def step_cost(step: Callable[[], Tensor]) -> StepCost:
    cost = StepCost()
    with _fused_ops_counted(cost), _Counting(cost):
        step()
    return cost
