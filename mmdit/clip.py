"""The CLIP text transformer: OpenAI CLIP-L/14 (FLUX, SD3) and OpenCLIP bigG/14 (SD3).

A GPT-style stack: token + learned position embeddings, pre-LayerNorm blocks of causal
self-attention and an MLP, a final LayerNorm. The pooled vector is the final-normed state at the EOS
token, projected by `text_projection` when the checkpoint has one. Attribute names are the Hugging
Face on-disk keys (`text_model.encoder.layers.N.self_attn.q_proj`, ...), so the official files load
strictly.

Deviations from the reference (transformers' `CLIPTextModel[WithProjection]`):
- the EOS position is `argmax(input_ids)` (the highest id, 49407, comes first), as transformers does
  for the legacy configs these models ship with; no padding mask, only the causal one;
- `skip` returns the output of an earlier layer without the final norm, as SD3 uses it
  (`skip=1` is transformers' `hidden_states[-2]`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .layers import WeightsModule

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": F.gelu,  # OpenCLIP (erf form)
}


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"
    projection_dim: int | None = None  # text_projection's output size; None: no projection
    eps: float = 1e-5

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.act!r}: expected one of {', '.join(ACTIVATIONS)}")


CLIP_PRESETS = {
    "clip-l": CLIPConfig(),
    "clip-g": CLIPConfig(width=1280, layers=32, heads=20, mlp_dim=5120, act="gelu", projection_dim=1280),
}


class SelfAttention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (
            rearrange(p(x), "b l (h d) -> b h l d", h=self.heads) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, D/H)
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)"))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.act]
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # (B, L, D)
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.layers)])


class TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class CLIPTextEncoder(WeightsModule):
    """`enc(input_ids (B, L), skip=0) -> (hidden (B, L, width), pooled (B, projection_dim or width))`.

    hidden: with skip=0 the last layer's output after the final norm; otherwise the output of the
    layer `skip` before the last, without the final norm. pooled never depends on `skip`.
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = TextTransformer(cfg)
        self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim else None

    def forward(self, input_ids: Tensor, skip: int = 0) -> tuple[Tensor, Tensor]:
        tm, n = self.text_model, self.cfg.layers
        if not 0 <= skip < n:
            raise ValueError(f"skip={skip}: this CLIP has {n} layers, so skip must be in [0, {n - 1}]")
        if input_ids.shape[1] > self.cfg.max_positions:
            raise ValueError(f"{input_ids.shape[1]} tokens: this CLIP takes at most {self.cfg.max_positions}")
        x = tm.embeddings(input_ids)  # (B, L, D)
        for i, layer in enumerate(tm.encoder.layers):
            x = layer(x)
            if i == n - 1 - skip:
                hidden = x
        x = tm.final_layer_norm(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]  # (B, D)
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return (x if skip == 0 else hidden), pooled
