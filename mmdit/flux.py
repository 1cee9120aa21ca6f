"""FLUX.1 (dev, schnell, and any config a FLUX checkpoint implies): the MM-DiT of Black Forest Labs.

Double-stream blocks keep separate weights for text and image tokens and meet in one joint
attention; single-stream blocks run on the concatenated sequence `[txt | img]` with a parallel
attention + MLP layer. Conditioning (timestep, guidance, pooled CLIP vector) enters through adaLN.
Attribute names are BFL's checkpoint keys (BFL flux `src/flux/model.py`, `src/flux/modules/layers.py`;
docs/formats.md, FLUX BFL layout), so `flux1-dev.safetensors` loads with a strict `load_state_dict`.
TACA's temperature is passed to every joint attention.

Interface (shared by every family): `model(x, t, context, pooled, guidance=None, temperature=None) -> v`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from .attention import JointAttention, Temperature, as_temperature_matrix
from .layers import (
    LastLayer,
    MLPEmbedder,
    Modulation,
    RMSNorm,
    WeightsModule,
    apply_rope,
    gated,
    layer_norm,
    modulations,
    rope_cos_sin,
    timestep_embedding,
)


@dataclass(frozen=True)
class FluxParams:
    family: ClassVar[str] = "flux"
    in_channels: int = 64  # packed 2x2 patches of 16 latent channels (Fill: 384, Depth/Canny: 128)
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled
    context_in_dim: int = 4096  # T5-XXL
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims per position axis (index, row, col)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev: distilled guidance; schnell: none

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"RoPE axes_dim {list(self.axes_dim)} must sum to the head dim {self.head_dim}")
        if self.in_channels % 4 or self.out_channels % 4:
            raise ValueError("in_channels and out_channels count packed 2x2 patches: multiples of 4")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def tiny(self) -> FluxParams:
        """Same layout and input widths, two blocks of each kind, two heads of the real head dim (RoPE stays valid)."""
        return replace(self, hidden_size=2 * self.head_dim, num_heads=2, depth=2, depth_single_blocks=2)


PRESETS = {
    "flux-dev": FluxParams(),
    "flux-schnell": FluxParams(guidance_embed=False),
}


class AdaLN(nn.Module):
    """`lin(silu(vec))` as `n / 3` (shift, scale, gate) modulations. BFL's `Modulation` (key: `.lin`)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, n * dim)

    def forward(self, vec_silu: Tensor) -> list[Modulation]:
        return modulations(self.lin(vec_silu), self.n)


class QKNorm(nn.Module):
    """RMSNorm of queries and keys over the head dim (weights: `query_norm.scale`, `key_norm.scale`)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q), self.key_norm(k)


class SelfAttention(nn.Module):
    """The per-stream projections of a double block (`qkv`, `norm`, `proj`); attention itself is joint."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qk_v(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # the fused rows are ordered (q|k|v, head, head_dim)
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k)
        return q, k, v


def mlp(dim: int, hidden: int) -> nn.Sequential:
    """Linear -> GELU (tanh) -> Linear, keys `.0` and `.2` (BFL's `img_mlp`, `txt_mlp`)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def rope_qk(q: Tensor, k: Tensor, pe: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """RoPE on queries and keys (B, H, L, D); pe: the (cos, sin) tables of `rope_cos_sin`."""
    return apply_rope(q, *pe), apply_rope(k, *pe)


class DoubleStreamBlock(nn.Module):
    """Separate weights for the image and the text stream (adaLN, qkv, MLP), one joint attention over `[txt | img]`."""

    def __init__(self, p: FluxParams):
        super().__init__()
        h = p.hidden_size
        self.img_mod = AdaLN(h, 6)
        self.img_norm1 = layer_norm(h)
        self.img_attn = SelfAttention(h, p.num_heads, p.qkv_bias)
        self.img_norm2 = layer_norm(h)
        self.img_mlp = mlp(h, p.mlp_hidden)
        self.txt_mod = AdaLN(h, 6)
        self.txt_norm1 = layer_norm(h)
        self.txt_attn = SelfAttention(h, p.num_heads, p.qkv_bias)
        self.txt_norm2 = layer_norm(h)
        self.txt_mlp = mlp(h, p.mlp_hidden)
        self.attention = JointAttention()  # no weights: where the probe hooks in

    def forward(
        self, img: Tensor, txt: Tensor, vec_silu: Tensor, pe: tuple[Tensor, Tensor], temperature: Temperature = None
    ) -> tuple[Tensor, Tensor]:
        """img: (B, L_img, D); txt: (B, L_txt, D); vec_silu: (B, D); pe: RoPE of `[txt | img]`. Returns (img, txt)."""
        img_m1, img_m2 = self.img_mod(vec_silu)
        txt_m1, txt_m2 = self.txt_mod(vec_silu)
        img_q, img_k, img_v = self.img_attn.qk_v(img_m1(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self.txt_attn.qk_v(txt_m1(self.txt_norm1(txt)))
        q, k = rope_qk(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), pe)  # (B, H, L, D)
        attn = self.attention(q, k, torch.cat((txt_v, img_v), 2), txt.shape[1], temperature)  # (B, L, H*D)
        txt_a, img_a = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = gated(img, img_m1.gate, self.img_attn.proj(img_a))
        img = gated(img, img_m2.gate, self.img_mlp(img_m2(self.img_norm2(img))))
        txt = gated(txt, txt_m1.gate, self.txt_attn.proj(txt_a))
        txt = gated(txt, txt_m2.gate, self.txt_mlp(txt_m2(self.txt_norm2(txt))))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on `[txt | img]`: `linear1` makes q, k, v and the MLP input in one matmul."""

    def __init__(self, p: FluxParams):
        super().__init__()
        h = self.hidden = p.hidden_size
        self.num_heads = p.num_heads
        self.linear1 = nn.Linear(h, 3 * h + p.mlp_hidden)
        self.linear2 = nn.Linear(h + p.mlp_hidden, h)
        self.norm = QKNorm(p.head_dim)
        self.pre_norm = layer_norm(h)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = AdaLN(h, 3)
        self.attention = JointAttention()  # no weights: where the probe hooks in

    def forward(
        self, x: Tensor, vec_silu: Tensor, pe: tuple[Tensor, Tensor], n_txt: int, temperature: Temperature = None
    ) -> Tensor:
        """x: (B, L, D), the sequence `[txt | img]` of which n_txt text tokens; vec_silu: (B, D). Returns (B, L, D)."""
        (mod,) = self.modulation(vec_silu)
        h = self.linear1(mod(self.pre_norm(x)))  # (B, L, 3H + M)
        qkv, mlp_in = h[..., : 3 * self.hidden], h[..., 3 * self.hidden :]
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = rope_qk(*self.norm(q, k), pe)
        attn = self.attention(q, k, v, n_txt, temperature)  # (B, L, H*D)
        return gated(x, mod.gate, self.linear2(torch.cat((attn, self.mlp_act(mlp_in)), -1)))


def image_ids(h: int, w: int, device=None) -> Tensor:
    """Position ids of the packed image tokens: (h*w, 3) = (0, row, col), row-major."""
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


class Flux(WeightsModule):
    """The FLUX.1 transformer: `model(x, t, context, pooled, guidance=None, temperature=None) -> v`."""

    family = FluxParams.family

    def __init__(self, params: FluxParams = PRESETS["flux-dev"]):
        super().__init__()
        p = self.params = params
        h = p.hidden_size
        self.img_in = nn.Linear(p.in_channels, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(p.vec_in_dim, h)
        self.guidance_in = MLPEmbedder(256, h) if p.guidance_embed else None
        self.txt_in = nn.Linear(p.context_in_dim, h)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(p) for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(p) for _ in range(p.depth_single_blocks))
        self.final_layer = LastLayer(h, p.out_channels)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        pooled: Tensor,
        guidance: Tensor | None = None,
        temperature: Temperature = None,
    ) -> Tensor:
        """x: (B, C, h, w) latents, h and w even; t: (B,) in [0, 1]; context: (B, L, 4096); pooled: (B, 768).

        guidance: (B,) distilled-guidance scale as written by a user (3.5), dev-type models only.
        Returns the velocity (B, out_channels/4, h, w) in x's dtype.
        """
        B, _, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"latent height and width must be even for 2x2 packing, got {H}x{W}")
        if self.guidance_in is not None and guidance is None:
            raise ValueError("this is a guidance-distilled FLUX model (dev-type): pass guidance, e.g. 3.5")
        dt = self.dtype
        img = rearrange(x.to(dt), "B C (h ph) (w pw) -> B (h w) (C ph pw)", ph=2, pw=2)  # (B, L_img, 4C)
        if img.shape[-1] != self.params.in_channels:
            raise ValueError(f"latents have {x.shape[1]} channels, the model takes {self.params.in_channels // 4}")

        # Conditioning vector: timestep (x1000, as BFL's time_factor), guidance (x1000 too), pooled text
        vec = self.time_in(timestep_embedding(t * 1000).to(dt))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(t.device) * 1000).to(dt))
        vec = vec + self.vector_in(pooled.to(dt))
        vec_silu = nn.functional.silu(vec)  # every adaLN starts with SiLU; compute it once

        temperature = as_temperature_matrix(temperature, x.device)  # once, not in every attention
        img = self.img_in(img)
        txt = self.txt_in(context.to(dt))
        n_txt = txt.shape[1]
        ids = torch.cat((torch.zeros(n_txt, 3, device=x.device), image_ids(H // 2, W // 2, x.device)))
        pe = rope_cos_sin(ids[None], list(self.params.axes_dim), self.params.theta)  # (1, 1, L, D) each

        for block in self.double_blocks:
            img, txt = block(img, txt, vec_silu, pe, temperature)
        seq = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            seq = block(seq, vec_silu, pe, n_txt, temperature)
        out = self.final_layer(seq[:, n_txt:], vec)  # (B, L_img, out_channels)
        return rearrange(out, "B (h w) (C ph pw) -> B C (h ph) (w pw)", h=H // 2, ph=2, pw=2).to(x.dtype)
