"""FLUX.2 ([dev], [klein] 4B and 9B, and any config a FLUX.2 checkpoint implies): BFL's second MM-DiT.

The same two kinds of blocks as FLUX.1 (mmdit/flux.py): double-stream blocks with separate text and
image weights meeting in one joint attention, then parallel single-stream blocks on `[txt | img]`.
What changed, side by side with FLUX.1:
- adaLN is computed once per forward and shared by every block of a kind
  (`double_stream_modulation_img`, `double_stream_modulation_txt`, `single_stream_modulation`);
  FLUX.1 has one `img_mod` / `txt_mod` / `modulation` per block;
- no biases anywhere;
- the MLP is a fused SwiGLU, `silu(a) * b` with `[a | b] = W_in x`, mlp_ratio 3 (FLUX.1: GELU, 4);
- RoPE over four position axes (t, h, w, l), 32 dims each, theta 2000 (FLUX.1: three, 10 000);
- no pooled text vector: the conditioning vector is the timestep (+ distilled guidance for [dev]);
- 128 input channels: 2x2 patches of the new 32-channel autoencoder's latents.
Attribute names are BFL's checkpoint keys, so `flux2-dev.safetensors` loads with a strict `load_state_dict`.
TACA's temperature reaches every joint attention of both block types.

Positions (BFL flux2 `src/flux2/sampling.py` `prc_txt` / `prc_img` / `encode_image_refs`; Diffusers 0.42.1
`pipelines/flux2/pipeline_flux2.py` `_prepare_text_ids` / `_prepare_latent_ids` / `_prepare_image_ids`):
text token l is at (0, 0, 0, l), image token (row, col) at (0, row, col, 0), and the token (row, col) of
reference image i (editing) at (10 + 10 i, row, col, 0). Sequence order: text | image | reference 1 | ...

Interface (shared by every family): `model(x, t, context, pooled=None, guidance=None, temperature=None) -> v`,
plus `ref_latents` for editing.

Sources: BFL flux2 `src/flux2/model.py`; Diffusers 0.42.1 `models/transformers/transformer_flux2.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .attention import JointAttention, Temperature, as_temperature_matrix
from .flux import QKNorm, rope_qk
from .layers import (
    LastLayer,
    MLPEmbedder,
    Modulation,
    WeightsModule,
    gated,
    layer_norm,
    modulations,
    rope_cos_sin,
    timestep_embedding,
)

# Reference image i sits at t = 10 + 10 i (BFL `encode_image_refs`, Diffusers `_prepare_image_ids`).
REFERENCE_T_STEP = 10


@dataclass(frozen=True)
class Flux2Params:
    family: ClassVar[str] = "flux2"

    in_channels: int = 128  # 2x2 patches of 32 latent channels; the output has as many
    # three stacked LLM layers: Mistral-Small 3 x 5120 ([dev]), Qwen3-4B 3 x 2560, Qwen3-8B 3 x 4096
    context_in_dim: int = 15360
    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8  # double-stream blocks
    depth_single_blocks: int = 48
    mlp_ratio: float = 3.0
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # RoPE dims per position axis (t, h, w, l)
    theta: int = 2000
    guidance_embed: bool = True  # [dev]: distilled guidance; [klein]: none

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim or any(d % 2 for d in self.axes_dim):
            raise ValueError(
                f"RoPE axes_dim {list(self.axes_dim)} must be even and sum to the head dim {self.head_dim}"
            )
        if len(self.axes_dim) != 4:
            raise ValueError(f"FLUX.2 positions have 4 axes (t, h, w, l), got axes_dim {list(self.axes_dim)}")
        if self.in_channels % 4:
            raise ValueError(f"in_channels counts 2x2 patches: a multiple of 4, got {self.in_channels}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def tiny(self) -> Flux2Params:
        """Same layout and input widths, two blocks of each kind, two heads of the real head dim 128."""
        return replace(self, hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2)


# Transformer configs of the official checkpoints: Diffusers `scripts/convert_flux2_to_diffusers.py`
# (`get_flux2_transformer_config`: "flux2-dev", "klein-4b", "klein-9b"), the script that converts BFL's files
# for the Diffusers repos. The distilled and base [klein] share a layout.
PRESETS = {
    "flux2-dev": Flux2Params(),
    "flux2-klein-4b": Flux2Params(context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5,
                                  depth_single_blocks=20, guidance_embed=False),
    "flux2-klein-9b": Flux2Params(context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8,
                                  depth_single_blocks=24, guidance_embed=False),
}


# ---- positions ----


def text_ids(n: int, device=None) -> Tensor:
    """(n, 4) positions of the text tokens: (0, 0, 0, l), the token index on the last axis."""
    ids = torch.zeros(n, 4, device=device)
    ids[:, 3] = torch.arange(n, device=device)
    return ids


def image_ids(h: int, w: int, t: int = 0, device=None) -> Tensor:
    """(h*w, 4) positions of h x w packed image tokens, row-major: (t, row, col, 0)."""
    ids = torch.zeros(h, w, 4, device=device)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 4)


def reference_t(i: int) -> int:
    """The t coordinate of reference image i (0-based): 10, 20, 30, ..."""
    return REFERENCE_T_STEP * (i + 1)


def patchify(x: Tensor) -> Tensor:
    """(B, C, 2h, 2w) latents -> (B, h*w, 4C) tokens: channels (c, ph, pw), tokens row-major.
    Equals Diffusers' `Flux2Pipeline._patchify_latents` followed by `_pack_latents`."""
    return rearrange(x, "B C (h ph) (w pw) -> B (h w) (C ph pw)", ph=2, pw=2)


# ---- blocks ----


class SharedModulation(nn.Module):
    """adaLN computed once per forward for all blocks of a kind: `lin(silu(vec))` split into `sets`
    (shift, scale, gate) triples of (B, 1, D). BFL's `Modulation` (key `.lin`), without bias."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.lin = nn.Linear(dim, 3 * sets * dim, bias=False)

    def forward(self, vec_silu: Tensor) -> list[Modulation]:
        return modulations(self.lin(vec_silu), 3 * self.sets)


class SwiGLU(nn.Module):
    """`silu(a) * b` where `[a | b]` are the two halves of the last dim (the fused input projection)."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


def swiglu_mlp(dim: int, hidden: int) -> nn.Sequential:
    """Keys `.0` (dim -> 2 hidden: gate and value rows) and `.2` (hidden -> dim)."""
    return nn.Sequential(nn.Linear(dim, 2 * hidden, bias=False), SwiGLU(), nn.Linear(hidden, dim, bias=False))


class SelfAttention(nn.Module):
    """The per-stream projections of a double block (`qkv`, `norm`, `proj`); attention itself is joint."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qk_v(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # the fused rows are ordered (q|k|v, head, head_dim)
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k)
        return q, k, v


class DoubleStreamBlock(nn.Module):
    def __init__(self, p: Flux2Params):
        super().__init__()
        h = p.hidden_size
        self.img_norm1 = layer_norm(h)
        self.img_attn = SelfAttention(h, p.num_heads)
        self.img_norm2 = layer_norm(h)
        self.img_mlp = swiglu_mlp(h, p.mlp_hidden)
        self.txt_norm1 = layer_norm(h)
        self.txt_attn = SelfAttention(h, p.num_heads)
        self.txt_norm2 = layer_norm(h)
        self.txt_mlp = swiglu_mlp(h, p.mlp_hidden)
        self.attention = JointAttention()  # no weights: where the probe hooks in

    def forward(self, img: Tensor, txt: Tensor, img_mod: list[Modulation], txt_mod: list[Modulation],
                pe: tuple[Tensor, Tensor], temperature: Temperature = None) -> tuple[Tensor, Tensor]:
        (img_m1, img_m2), (txt_m1, txt_m2) = img_mod, txt_mod
        img_q, img_k, img_v = self.img_attn.qk_v(img_m1(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self.txt_attn.qk_v(txt_m1(self.txt_norm1(txt)))
        q, k = rope_qk(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), pe)  # (B, H, L, D), text first
        attn = self.attention(q, k, torch.cat((txt_v, img_v), 2), txt.shape[1], temperature)  # (B, L, H*D)
        txt_a, img_a = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = gated(img, img_m1.gate, self.img_attn.proj(img_a))
        img = gated(img, img_m2.gate, self.img_mlp(img_m2(self.img_norm2(img))))
        txt = gated(txt, txt_m1.gate, self.txt_attn.proj(txt_a))
        txt = gated(txt, txt_m2.gate, self.txt_mlp(txt_m2(self.txt_norm2(txt))))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + SwiGLU MLP on `[txt | img]`: `linear1` makes q, k, v and both MLP halves in one
    matmul, `linear2` projects `[attention | mlp]` back."""

    def __init__(self, p: Flux2Params):
        super().__init__()
        h = self.hidden = p.hidden_size
        self.num_heads = p.num_heads
        self.linear1 = nn.Linear(h, 3 * h + 2 * p.mlp_hidden, bias=False)
        self.linear2 = nn.Linear(h + p.mlp_hidden, h, bias=False)
        self.norm = QKNorm(p.head_dim)
        self.pre_norm = layer_norm(h)
        self.mlp_act = SwiGLU()
        self.attention = JointAttention()  # no weights: where the probe hooks in

    def forward(self, x: Tensor, mod: Modulation, pe: tuple[Tensor, Tensor], n_txt: int,
                temperature: Temperature = None) -> Tensor:
        h = self.linear1(mod(self.pre_norm(x)))  # (B, L, 3H + 2M)
        qkv, mlp_in = h[..., : 3 * self.hidden], h[..., 3 * self.hidden :]
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = rope_qk(*self.norm(q, k), pe)
        attn = self.attention(q, k, v, n_txt, temperature)  # (B, L, H*D)
        return gated(x, mod.gate, self.linear2(torch.cat((attn, self.mlp_act(mlp_in)), -1)))


# ---- the model ----


class Flux2(WeightsModule):
    """The FLUX.2 transformer: `model(x, t, context, pooled=None, guidance=None, temperature=None, ref_latents=None)`."""

    family = Flux2Params.family

    def __init__(self, params: Flux2Params = PRESETS["flux2-dev"]):
        super().__init__()
        p = self.params = params
        h = p.hidden_size
        self.img_in = nn.Linear(p.in_channels, h, bias=False)
        self.txt_in = nn.Linear(p.context_in_dim, h, bias=False)
        self.time_in = MLPEmbedder(256, h, bias=False)
        self.guidance_in = MLPEmbedder(256, h, bias=False) if p.guidance_embed else None
        self.double_stream_modulation_img = SharedModulation(h, 2)  # attention and MLP of each double block
        self.double_stream_modulation_txt = SharedModulation(h, 2)
        self.single_stream_modulation = SharedModulation(h, 1)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(p) for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(p) for _ in range(p.depth_single_blocks))
        self.final_layer = LastLayer(h, p.in_channels, bias=False)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        pooled: Tensor | None = None,
        guidance: Tensor | float | None = None,
        temperature: Temperature = None,
        ref_latents: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """x: (B, 32, h, w) latents (h, w even) in the autoencoder's batch-norm-normalized space;
        t: (B,) in [0, 1], the flow-matching sigma (x1000 inside, as Diffusers and BFL);
        context: (B, L, context_in_dim) stacked LLM hidden states; pooled: must be None (FLUX.2 has none).
        guidance: distilled-guidance scale as written by a user (4.0), a float or (B,), [dev]-type models only
        (x1000 inside); ignored by models without guidance embedding ([klein]), as Diffusers does.
        ref_latents: reference images for editing, each (B or 1, 32, h_i, w_i) like x; their tokens follow the
        image tokens at positions (10 + 10 i, row, col, 0) and count as image tokens for TACA.
        Returns the velocity (B, 32, h, w) of x's tokens only, in x's dtype.
        """
        B, (H, W) = x.shape[0], x.shape[-2:]
        p, ref_latents = self.params, () if ref_latents is None else list(ref_latents)
        if pooled is not None:
            raise ValueError("FLUX.2 has no pooled text vector: pass pooled=None")
        if self.guidance_in is not None and guidance is None:
            raise ValueError("this is a guidance-distilled FLUX.2 model ([dev]-type): pass guidance, e.g. 4.0")
        for z in (x, *ref_latents):
            if z.dim() != 4 or z.shape[-2] % 2 or z.shape[-1] % 2:
                raise ValueError(f"latents must be (B, C, h, w) with h and w even for 2x2 patches, got {list(z.shape)}")
            if 4 * z.shape[1] != p.in_channels:
                raise ValueError(f"latents have {z.shape[1]} channels, the model takes {p.in_channels // 4}")
            if z.shape[0] not in (1, B):
                raise ValueError(f"a reference latent has batch {z.shape[0]}, x has {B}")
        dt, dev = self.dtype, x.device

        # Tokens and positions: text | image | reference 1 | reference 2 ...
        n_txt, n_img = context.shape[1], (H // 2) * (W // 2)
        img = [patchify(x.to(dt))]  # (B, L_img, 4C)
        ids = [text_ids(n_txt, dev), image_ids(H // 2, W // 2, 0, dev)]
        for i, ref in enumerate(ref_latents):
            img.append(patchify(ref.to(dev, dt)).expand(B, -1, -1))
            ids.append(image_ids(ref.shape[-2] // 2, ref.shape[-1] // 2, reference_t(i), dev))
        pe = rope_cos_sin(torch.cat(ids)[None], list(p.axes_dim), p.theta)  # (1, 1, L, D) each

        # Conditioning vector: timestep and guidance, both x1000 (BFL's time_factor), then the shared adaLNs
        vec = self.time_in(timestep_embedding(t.to(dev) * 1000).to(dt))
        if self.guidance_in is not None:
            g = torch.as_tensor(guidance, dtype=torch.float32, device=dev).expand(B)
            vec = vec + self.guidance_in(timestep_embedding(g * 1000).to(dt))
        vec_silu = F.silu(vec)  # (B, D)
        img_mod = self.double_stream_modulation_img(vec_silu)
        txt_mod = self.double_stream_modulation_txt(vec_silu)
        (single_mod,) = self.single_stream_modulation(vec_silu)

        temperature = as_temperature_matrix(temperature, dev)  # once, not in every attention
        img = self.img_in(torch.cat(img, 1))  # (B, L_img + L_ref, D)
        txt = self.txt_in(context.to(dt))  # (B, L_txt, D)
        for block in self.double_blocks:
            img, txt = block(img, txt, img_mod, txt_mod, pe, temperature)
        seq = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            seq = block(seq, single_mod, pe, n_txt, temperature)
        out = self.final_layer(seq[:, n_txt : n_txt + n_img], vec)  # (B, L_img, 4C)
        return rearrange(out, "B (h w) (C ph pw) -> B C (h ph) (w pw)", h=H // 2, ph=2, pw=2).to(x.dtype)
