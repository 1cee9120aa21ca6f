"""SD3, SD3.5 Large (and Turbo) and SD3.5 Medium (MMDiT-X): the MM-DiT of Stability AI.

Every joint block has two streams, `context_block` (text) and `x_block` (image), each with its own
adaLN, projections and MLP; they meet in one joint attention over `[text | image]`. Conditioning
is `t_embedder(t) + y_embedder(pooled)`. Positions come from a 2D table `pos_embed` of P x P
patches (fixed sin-cos values, stored in the file), center-cropped to the latent. SD3.5 adds
RMSNorm on queries and keys (`ln_q`, `ln_k`); SD3.5 Medium (MMDiT-X) adds, in its first layers,
a second, image-only self-attention `attn2` with its own modulation. Facts: SAI sd3.5 `mmditx.py`;
the key layout: docs/formats.md, SD3 SAI layout.

Attribute names are SAI's checkpoint keys, so `sd3.5_large.safetensors` loads with a strict
`load_state_dict`. TACA's temperature goes to every joint attention, never to `attn2` (it has no
text tokens). Deviations from SAI: the timestep is `t` in [0, 1] (scaled by 1000 here), as in FLUX;
in half precision `ln_q` / `ln_k` (`nn.RMSNorm`) apply their weight before rounding (SAI and Diffusers after).

Interface (shared by every family): `model(x, t, context, pooled, guidance=None, temperature=None) -> v`;
SD3 also takes `skip_layers`, the joint blocks to skip (skip-layer guidance, sampling/sampler.py).
"""

from __future__ import annotations

import operator
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from .attention import JointAttention, Temperature, as_temperature_matrix, attention
from .layers import (
    LastLayer,
    Modulation,
    WeightsModule,
    gated,
    layer_norm,
    modulations,
    timestep_embedding,
)


@dataclass(frozen=True)
class SD3Params:
    family: ClassVar[str] = "sd3"
    depth: int = 24  # joint blocks
    hidden_size: int | None = None  # default 64 * depth (SAI's rule)
    num_heads: int | None = None  # default depth (head dim 64)
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int = 192  # the position table covers P x P patches
    adm_in_channels: int = 2048  # pooled CLIP-L + CLIP-G
    context_in_dim: int = 4096  # T5-XXL (CLIP features zero-padded to it)
    mlp_ratio: float = 4.0
    qk_norm: bool = False  # SD3.5: RMSNorm on q and k
    x_block_self_attn_layers: tuple[int, ...] = ()  # MMDiT-X: layers with the image-only `attn2`

    def __post_init__(self):
        if self.hidden_size is None:
            object.__setattr__(self, "hidden_size", 64 * self.depth)
        if self.num_heads is None:
            object.__setattr__(self, "num_heads", self.depth)
        object.__setattr__(self, "x_block_self_attn_layers", tuple(self.x_block_self_attn_layers))
        if self.depth < 1:
            raise ValueError(f"depth must be at least 1, got {self.depth}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.patch_size < 1 or self.pos_embed_max_size < 1:
            raise ValueError("patch_size and pos_embed_max_size must be positive")
        layers = self.x_block_self_attn_layers
        if list(layers) != sorted(set(layers)) or any(not 0 <= i < self.depth for i in layers):
            raise ValueError(f"x_block_self_attn_layers must be increasing indices below depth {self.depth}, got {layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def tiny(self) -> SD3Params:
        """Same layout and input widths, two blocks of head dim 64 (one with `attn2` if any), a table of <= 64 patches."""
        return replace(
            self, depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=min(self.pos_embed_max_size, 64),
            x_block_self_attn_layers=(0,) if self.x_block_self_attn_layers else (),
        )


# SD3.5 Large Turbo has the same layout as SD3.5 Large: nothing in the weights tells them apart.
PRESETS = {
    "sd3-medium": SD3Params(depth=24),
    "sd3.5-large": SD3Params(depth=38, qk_norm=True),
    "sd3.5-medium": SD3Params(depth=24, pos_embed_max_size=384, qk_norm=True, x_block_self_attn_layers=tuple(range(13))),
}


def skipped_blocks(layers: Collection[int], depth: int) -> tuple[int, ...]:
    """The joint-block indices to skip, sorted; an index outside 0..depth-1 is a ValueError."""
    blocks = sorted({operator.index(i) for i in layers})  # integers only: 7.0 or "7" is a TypeError
    for i in blocks:
        if not 0 <= i < depth:
            raise ValueError(f"skip_layers: there is no joint block {i}; the model has {depth} (0 to {depth - 1})")
    return tuple(blocks)


class VectorEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (SAI's keys: `mlp.0`, `mlp.2`)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    """p x p patches -> tokens, row-major: (B, C, H, W) -> (B, H/p * W/p, D)."""

    def __init__(self, p: SD3Params):
        super().__init__()
        self.proj = nn.Conv2d(p.in_channels, p.hidden_size, p.patch_size, stride=p.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "B D h w -> B (h w) D")


class SelfAttention(nn.Module):
    """The projections of one attention (`qkv`, `ln_q`, `ln_k`, `proj`); the attention itself is joint."""

    def __init__(self, p: SD3Params, pre_only: bool = False):
        super().__init__()
        self.num_heads = p.num_heads
        self.qkv = nn.Linear(p.hidden_size, 3 * p.hidden_size)
        self.ln_q = nn.RMSNorm(p.head_dim, eps=1e-6) if p.qk_norm else nn.Identity()  # SD3.5 (key: `weight`)
        self.ln_k = nn.RMSNorm(p.head_dim, eps=1e-6) if p.qk_norm else nn.Identity()
        self.proj = None if pre_only else nn.Linear(p.hidden_size, p.hidden_size)

    def qk_v(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # the fused rows are ordered (q|k|v, head, head_dim), as in FLUX
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        return self.ln_q(q), self.ln_k(k), v


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class StreamBlock(nn.Module):
    """One stream of a joint block (SAI's `DismantledBlock`).

    adaLN chunks: (shift, scale, gate) for the attention, then for the MLP, then (MMDiT-X) for `attn2`.
    A pre-only block has (shift, scale) and no output projection or MLP.
    """

    def __init__(self, p: SD3Params, pre_only: bool = False, self_attn2: bool = False):
        super().__init__()
        h = p.hidden_size
        self.pre_only = pre_only
        self.n_mod = 2 if pre_only else 9 if self_attn2 else 6
        self.norm1 = layer_norm(h)
        self.attn = SelfAttention(p, pre_only)
        self.attn2 = SelfAttention(p) if self_attn2 else None
        if not pre_only:
            self.norm2 = layer_norm(h)
            self.mlp = Mlp(h, p.mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, self.n_mod * h))

    def modulation(self, c: Tensor) -> list[Modulation]:
        return modulations(self.adaLN_modulation(c), self.n_mod)

    def post_attention(self, x: Tensor, attn: Tensor, mods: list[Modulation], x_norm: Tensor) -> Tensor:
        """x: (B, L, D) the stream's input; attn: (B, L, D) its rows of the joint attention; x_norm = norm1(x)."""
        m_attn, m_mlp = mods[0], mods[1]
        x = gated(x, m_attn.gate, self.attn.proj(attn))
        if self.attn2 is not None:
            # MMDiT-X: image-only self-attention on the same norm1(x), with its own modulation
            m_attn2 = mods[2]
            q, k, v = self.attn2.qk_v(m_attn2(x_norm))
            x = gated(x, m_attn2.gate, self.attn2.proj(attention(q, k, v, n_txt=0)))
        return gated(x, m_mlp.gate, self.mlp(m_mlp(self.norm2(x))))


class JointBlock(nn.Module):
    def __init__(self, p: SD3Params, index: int):
        super().__init__()
        # The last block's text output is never used (only image tokens reach the final layer), so
        # SAI keeps just what produces its keys and values: no proj, no MLP, a (shift, scale) adaLN.
        self.context_block = StreamBlock(p, pre_only=index == p.depth - 1)
        self.x_block = StreamBlock(p, self_attn2=index in p.x_block_self_attn_layers)
        self.attention = JointAttention()  # no weights: where the probe hooks in

    def forward(
        self, context: Tensor, x: Tensor, c: Tensor, temperature: Temperature = None
    ) -> tuple[Tensor | None, Tensor]:
        """context: (B, L_txt, D); x: (B, L_img, D); c: (B, D). Returns the new (context, x).

        The new context is None after the last (pre-only) block.
        """
        cb, xb = self.context_block, self.x_block
        c_mods, x_mods = cb.modulation(c), xb.modulation(c)
        c_norm, x_norm = cb.norm1(context), xb.norm1(x)
        c_q, c_k, c_v = cb.attn.qk_v(c_mods[0](c_norm))
        x_q, x_k, x_v = xb.attn.qk_v(x_mods[0](x_norm))
        n_txt = context.shape[1]
        q, k, v = (torch.cat(pair, dim=2) for pair in ((c_q, x_q), (c_k, x_k), (c_v, x_v)))  # (B, H, L, D)
        attn = self.attention(q, k, v, n_txt, temperature)  # (B, L, H*D)
        x = xb.post_attention(x, attn[:, n_txt:], x_mods, x_norm)
        context = None if cb.pre_only else cb.post_attention(context, attn[:, :n_txt], c_mods, c_norm)
        return context, x


class SD3(WeightsModule):
    """The SD3 / SD3.5 transformer: `model(x, t, context, pooled, guidance=None, temperature=None) -> v`."""

    family = SD3Params.family

    def __init__(self, params: SD3Params = PRESETS["sd3.5-large"]):
        super().__init__()
        p = self.params = params
        h = p.hidden_size
        self.x_embedder = PatchEmbed(p)
        # SAI's file stores the (fixed sin-cos) table, so it is a persistent buffer loaded like a weight
        self.register_buffer("pos_embed", torch.zeros(1, p.pos_embed_max_size**2, h))
        self.t_embedder = VectorEmbedder(256, h)
        self.y_embedder = VectorEmbedder(p.adm_in_channels, h)
        self.context_embedder = nn.Linear(p.context_in_dim, h)
        self.joint_blocks = nn.ModuleList(JointBlock(p, i) for i in range(p.depth))
        self.final_layer = LastLayer(h, p.patch_size**2 * p.out_channels)

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """The center h x w window of the P x P position table: (1, h*w, D)."""
        P = self.params.pos_embed_max_size
        if h > P or w > P:
            p = self.params.patch_size
            raise ValueError(
                f"latent of {h * p}x{w * p} ({h}x{w} patches) is larger than the position table of this model: "
                f"{P}x{P} patches (pos_embed_max_size), i.e. latents up to {P * p}x{P * p}"
            )
        top, left = (P - h) // 2, (P - w) // 2
        table = self.pos_embed.reshape(1, P, P, -1)[:, top : top + h, left : left + w]
        return table.reshape(1, h * w, -1)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        pooled: Tensor,
        guidance: Tensor | None = None,
        temperature: Temperature = None,
        skip_layers: Collection[int] = (),
    ) -> Tensor:
        """x: (B, C, H, W) latents, H and W multiples of the patch; t: (B,) in [0, 1];
        context: (B, L, 4096); pooled: (B, 2048).

        guidance is accepted for the shared interface and ignored (SD3 has no guidance embedder).
        skip_layers (SD3 only): indices of joint blocks that are skipped, both streams passing through
        unchanged, as Diffusers' `skip_layers` (skip-layer guidance's branch); an index outside the
        model is a ValueError.
        Returns the velocity (B, out_channels, H, W) in x's dtype.
        """
        p = self.params
        _, C, H, W = x.shape
        if H % p.patch_size or W % p.patch_size:
            raise ValueError(f"latent height and width must be multiples of the patch size {p.patch_size}, got {H}x{W}")
        if C != p.in_channels:
            raise ValueError(f"latents have {C} channels, the model takes {p.in_channels}")
        h, w = H // p.patch_size, W // p.patch_size
        dt = self.dtype
        img = self.x_embedder(x.to(dt)) + self.cropped_pos_embed(h, w)  # (B, h*w, D)
        c = self.t_embedder(timestep_embedding(t * 1000).to(dt)) + self.y_embedder(pooled.to(dt))  # (B, D)
        txt = self.context_embedder(context.to(dt))  # (B, L_txt, D)

        temperature = as_temperature_matrix(temperature, x.device)  # once, not in every attention
        skip = skipped_blocks(skip_layers, p.depth)
        for i, block in enumerate(self.joint_blocks):
            if i not in skip:  # a skipped block is the identity for both streams
                txt, img = block(txt, img, c, temperature)
        out = self.final_layer(img, c)  # (B, h*w, p*p*C_out), features ordered (py, px, c)
        return rearrange(out, "B (h w) (ph pw C) -> B C (h ph) (w pw)", h=h, ph=p.patch_size, pw=p.patch_size).to(x.dtype)
