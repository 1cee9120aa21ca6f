"""Layers shared by the MM-DiT families: timestep embedding, embedder MLPs, RMSNorm, adaLN, RoPE.

Attribute names follow the official checkpoints (BFL's `in_layer`/`out_layer`, RMSNorm's `scale`),
so an official file loads with a strict `load_state_dict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class WeightsModule(nn.Module):
    """An nn.Module that reports the dtype and device of its (first) weights."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def run_block(model: nn.Module, block: nn.Module, *args):
    """`block(*args)`, recomputed in the backward pass when `model.gradient_checkpointing` is set."""
    if getattr(model, "gradient_checkpointing", False) and model.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def layer_norm(dim: int) -> nn.LayerNorm:
    """LayerNorm without affine weights (adaLN supplies scale and shift), eps 1e-6."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding `[cos(t f_k), sin(t f_k)]`, `f_k = max_period^(-k / (dim/2))`. t: (B,) -> (B, dim), fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (BFL's names: `in_layer`, `out_layer`; FLUX.2 has no biases)."""

    def __init__(self, in_dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, bias=bias)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMS normalization computed in fp32 (inside `F.rms_norm`, one fused kernel on CUDA), cast back, then scaled."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps) * weight.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim. BFL calls the weight `scale` (its checkpoint key); SAI calls it `weight`."""

    def __init__(self, dim: int, weight_name: str = "scale", eps: float = 1e-6):
        super().__init__()
        self.weight_name, self.eps = weight_name, eps
        setattr(self, weight_name, nn.Parameter(torch.ones(dim)))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, getattr(self, self.weight_name), self.eps)


@dataclass
class Modulation:
    """One adaLN modulation: `(1 + scale) * norm(x) + shift`, and the residual gate."""

    shift: Tensor  # (B, 1, D)
    scale: Tensor
    gate: Tensor | None = None

    def __call__(self, x_normed: Tensor) -> Tensor:
        return torch.addcmul(self.shift, 1 + self.scale, x_normed)  # one pass


def gated(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """The gated residual `x + gate * y`, in one pass."""
    return torch.addcmul(x, gate, y)


def modulations(emb: Tensor, n: int) -> list[Tensor]:
    """Split an adaLN output (B, n*D) into n chunks of (B, 1, D)."""
    return list(emb[:, None, :].chunk(n, dim=-1))


class LastLayer(nn.Module):
    """adaLN (shift first, as in BFL and SAI), then the projection to patch values (FLUX.2: no biases)."""

    def __init__(self, hidden: int, out_features: int, bias: bool = True):
        super().__init__()
        self.norm_final = layer_norm(hidden)
        self.linear = nn.Linear(hidden, out_features, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=bias))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = modulations(self.adaLN_modulation(vec), 2)
        return self.linear(Modulation(shift, scale)(self.norm_final(x)))


# ---- Rotary position embedding (FLUX): interleaved pairs, per-axis frequencies ----


def rope_frequencies(ids: Tensor, axes_dim: list[int], theta: int) -> Tensor:
    """Angles for each position: ids (B, L, n_axes) -> (B, L, sum(axes_dim)/2), fp32 (fp64 on CPU for exactness)."""
    dtype = torch.float64 if ids.device.type == "cpu" else torch.float32
    angles = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=dtype, device=ids.device) / d)  # (d/2,)
        angles.append(ids[..., i].to(dtype)[..., None] * omega)
    return torch.cat(angles, dim=-1).float()


def rope_cos_sin(ids: Tensor, axes_dim: list[int], theta: int) -> tuple[Tensor, Tensor]:
    """The tables of `apply_rope`, (B, 1, L, D) to broadcast over heads: each pair's cos twice
    (c0, c0, c1, c1, ...) and its sin signed for the swapped pairs (-s0, s0, -s1, s1, ...)."""
    a = rope_frequencies(ids, axes_dim, theta)[:, None]
    return a.cos().repeat_interleave(2, -1), torch.stack((-a.sin(), a.sin()), -1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2k], x[2k+1]) by the angle k, in fp32. x: (B, H, L, D).

    (x0 c - x1 s, x1 c + x0 s) = x * (c, c) + (x1, x0) * (-s, s); bf16 x meets the fp32 tables inside
    each op (no fp32 copy of x on CUDA), and torch.compile fuses the three ops into one kernel."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return torch.addcmul(x * cos, swapped, sin).to(x.dtype)
