"""Layers of the MM-DiT families: timestep embedding, BFL's embedder MLP and RMSNorm, adaLN, RoPE.

Attribute names follow the official checkpoints (BFL's `in_layer`/`out_layer`, RMSNorm's `scale`),
so an official file loads with a strict `load_state_dict`.

adaLN is written as the paper writes it, `(1 + scale) * x + shift`. Fused: the gated residual
`x + gate * y` and RoPE's rotation run as `torch.addcmul` (RoPE with a pre-signed sin table), the plain
formula beside each. In eager mode a plain form makes more passes over the activations:
`python -m benchmarks.step_time --cost` puts FLUX-dev's step floor 1.0% higher for the plain gate and
8.5% higher for plain RoPE in fp32 (plain adaLN: 1.0%, kept), so those two stay fused.
`torch.compile` fuses the plain forms alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightsModule(nn.Module):
    """An nn.Module that reports the dtype and device of its (first) weights."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


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


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, as BFL's: normalized in fp32 (inside `F.rms_norm`, one fused kernel on
    CUDA), cast back, then scaled. The weight is `scale`, BFL's checkpoint key (SAI and T5 call it `weight`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=1e-6) * self.scale.to(x.dtype)


@dataclass
class Modulation:
    """One adaLN modulation, chunks of (B, 1, D): `(1 + scale) * norm(x) + shift`, and the residual gate."""

    shift: Tensor
    scale: Tensor
    gate: Tensor | None = None  # None where the output has no residual (a final layer, SD3's pre-only block)

    def __call__(self, x_normed: Tensor) -> Tensor:
        return (1 + self.scale) * x_normed + self.shift


def gated(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """The gated residual, in one pass (fused: see the module docstring)."""
    return torch.addcmul(x, gate, y)  # x + gate * y


def modulations(emb: Tensor, n: int) -> list[Modulation]:
    """An adaLN output (B, n*D) as (shift, scale, gate) triples of (B, 1, D) chunks (a last pair: no gate)."""
    chunks = emb[:, None, :].chunk(n, dim=-1)
    return [Modulation(*chunks[i : i + 3]) for i in range(0, n, 3)]


class LastLayer(nn.Module):
    """adaLN (shift first, as in BFL and SAI), then the projection to patch values (FLUX.2: no biases)."""

    def __init__(self, hidden: int, out_features: int, bias: bool = True):
        super().__init__()
        self.norm_final = layer_norm(hidden)
        self.linear = nn.Linear(hidden, out_features, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=bias))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        (mod,) = modulations(self.adaLN_modulation(vec), 2)  # (shift, scale)
        return self.linear(mod(self.norm_final(x)))


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
    """The tables of `apply_rope`, fp32 (B, 1, L, D) to broadcast over heads: each pair's cos twice
    (c0, c0, c1, c1, ...) and its sin signed for the swapped pairs (-s0, s0, -s1, s1, ...)."""
    angles = rope_frequencies(ids, axes_dim, theta)[:, None]  # (B, 1, L, D/2)
    return angles.cos().repeat_interleave(2, -1), torch.stack((-angles.sin(), angles.sin()), -1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x0, x1) = (x[2k], x[2k+1]) by its angle, in fp32 (BFL's `apply_rope`). x: (B, H, L, D).

    The rotation (x0 c - x1 s, x0 s + x1 c) is computed as x * (c, c) + (x1, x0) * (-s, s) (fused: see
    the module docstring): bf16 x meets the fp32 tables inside each op, with no fp32 copy of x.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return torch.addcmul(x * cos, swapped, sin).to(x.dtype)  # per pair: (x0 cos - x1 sin, x0 sin + x1 cos)
