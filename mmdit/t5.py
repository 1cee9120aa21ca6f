"""The T5 v1.1 encoder (T5-XXL for FLUX and SD3): the text encoder half of T5, nothing of the decoder.

Pre-norm blocks of self-attention and a gated-GELU feed-forward, RMS norms without bias. Position
enters only as a learned bias on the attention logits, indexed by the bucketed offset `key - query`;
block 0 holds that bias and every block reuses it. Attribute names are the Hugging Face checkpoint
keys (`shared`, `encoder.block.N.layer.0.SelfAttention.q`, ...), so the official files load strictly.

Deviations from the reference (transformers' `T5EncoderModel`), same results in float32:
- no attention mask: every token, padding included, is attended to, as FLUX and SD3 use it;
- fp16: T5 v1.1's residual stream and feed-forward outputs outgrow the fp16 range (65504). Instead of
  clamping as transformers does, the residual stream is kept in fp32 throughout, and with fp16
  weights the feed-forward's gate product and `wo` run in fp32 (the sublayers see their input in the
  weights' dtype). The output, after the final norm, is cast back to the weights' dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .layers import WeightsModule


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64  # head dim
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_buckets: int = 32  # relative position buckets, half per direction
    max_distance: int = 128  # offsets this far or farther share the last bucket
    eps: float = 1e-6

    def __post_init__(self):
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"num_buckets must be even and >= 4, got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(f"max_distance {self.max_distance} must exceed num_buckets/4 = {self.num_buckets // 4}")


T5_PRESETS = {"t5-v1.1-xxl": T5Config()}


def relative_position_bucket(offset: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5 buckets of `key - query` offsets.

    Half of the buckets per direction (the upper half for keys after the query); within one half, the
    first `n/2` offsets get a bucket each, larger ones share log-spaced buckets up to `max_distance`.
    """
    n = num_buckets // 2
    exact = n // 2
    bucket = (offset > 0).long() * n
    dist = offset.abs()
    # exact + floor(log(dist / exact) / log(max_distance / exact) * (n - exact)), capped at n - 1
    log_bucket = exact + (
        torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (n - exact)
    ).long()
    return bucket + torch.where(dist < exact, dist, log_bucket.clamp(max=n - 1))


class T5LayerNorm(nn.Module):
    """T5's "layer norm": RMS normalization (no mean, no bias) computed in fp32, then the weight, in x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight.to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head attention without 1/sqrt(d) scaling (T5 folds it into the weights), plus the position bias."""

    def __init__(self, cfg: T5Config, has_position_bias: bool):
        super().__init__()
        self.cfg = cfg
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_position_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def position_bias(self, length: int, device: torch.device) -> Tensor:
        """The additive logit bias, (1, H, L, L); only block 0 has the weights."""
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets, self.cfg.max_distance)
        return rearrange(self.relative_attention_bias(buckets), "lq lk h -> 1 h lq lk")

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        q, k, v = (rearrange(p(x), "b l (h d) -> b h l d", h=self.cfg.num_heads) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # (B, H, L, d_kv)
        return self.o(rearrange(out, "b h l d -> b l (h d)"))


class DenseReluDense(nn.Module):
    """Gated-GELU feed-forward `wo(gelu_tanh(wi_0 x) * wi_1 x)` (the key name dates from T5 v1.0's ReLU)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, lin = self.wi_0(x), self.wi_1(x)  # (B, L, d_ff)
        if x.dtype == torch.float16:  # the product and wo's output overflow fp16: finish in fp32
            return F.linear(F.gelu(gate.float(), approximate="tanh") * lin.float(), self.wo.weight.float())
        return self.wo(F.gelu(gate, approximate="tanh") * lin)


class AttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_position_bias: bool):
        super().__init__()
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)
        self.SelfAttention = SelfAttention(cfg, has_position_bias)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.SelfAttention(self.layer_norm(x).to(self.layer_norm.weight.dtype), bias)


class FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)
        self.DenseReluDense = DenseReluDense(cfg)

    def forward(self, x: Tensor) -> Tensor:
        return self.DenseReluDense(self.layer_norm(x).to(self.layer_norm.weight.dtype))


class Block(nn.Module):
    def __init__(self, cfg: T5Config, has_position_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([AttentionLayer(cfg, has_position_bias), FeedForwardLayer(cfg)])

    def forward(self, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """(x, bias) -> (x, bias); the first block, which holds the bias table, makes the bias (bias None)."""
        if bias is None:
            bias = self.layer[0].SelfAttention.position_bias(x.shape[1], x.device)  # (1, H, L, L)
        x = x + self.layer[0](x, bias).float()  # (B, L, D), fp32 residual stream
        return x + self.layer[1](x).float(), bias


class Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList([Block(cfg, has_position_bias=i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)


class T5Encoder(WeightsModule):
    """`enc(input_ids (B, L)) -> hidden (B, L, d_model)`, after the final norm, in the weights' dtype."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)  # the file may call it encoder.embed_tokens
        self.encoder = Stack(cfg)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.shared(input_ids).float()  # (B, L, D)
        bias = None
        for block in self.encoder.block:
            x, bias = block(x, bias)
        return self.encoder.final_layer_norm(x).to(self.dtype)
