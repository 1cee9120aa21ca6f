"""A decoder-only LLM used as a text encoder: the Qwen3 and Mistral text stacks, for FLUX.2.

FLUX.2 encodes a prompt with an instruction-tuned LLM and takes, instead of its last layer, the hidden
states of three intermediate layers, concatenated per token (BFL flux2 `src/flux2/text_encoder.py`;
Diffusers 0.42.1 `pipelines/flux2/pipeline_flux2_klein.py` `_get_qwen3_prompt_embeds`):
- [klein] 4B / 9B: Qwen3-4B / Qwen3-8B, layers (9, 18, 27) -> 3 x 2560 = 7680 / 3 x 4096 = 12288 wide;
- [dev]: the text part of Mistral-Small-3.x (`Mistral3ForConditionalGeneration`), layers (10, 20, 30) -> 15360.
A layer index counts as transformers' `hidden_states` does: 0 is the embedding output, k the output of
decoder layer k (1-based), without the final norm. Only the `max(out_layers)` first decoder layers are
built and run; the later ones, the final norm and `lm_head` are not part of this model.

Each decoder layer is pre-norm (transformers `models/qwen3/modeling_qwen3.py`, `models/mistral/modeling_mistral.py`):

    x = x + o_proj(attention(RoPE(q_norm(q)), RoPE(k_norm(k)), v))    # q, k, v from input_layernorm(x)
    x = x + down_proj(silu(gate_proj(h)) * up_proj(h))                 # h = post_attention_layernorm(x)

with RMS norms (weight `weight`), no biases, grouped-query attention (`num_key_value_heads` k/v heads,
each shared by `num_attention_heads / num_key_value_heads` query heads), and q/k norms over the head
dim for Qwen3 only. RoPE rotates the pairs (x[i], x[i + d/2]) (transformers' `rotate_half` layout, not
FLUX's interleaved pairs) by `position * theta^(-2i/d)`; positions are 0..L-1 whatever the padding.

The attention is causal, and padded tokens (attention_mask 0) are masked as keys, exactly as
transformers builds its mask: pads still get hidden states (they are queries), and those are part of
the context FLUX.2 feeds its transformer. With right padding (klein) every query sees at least the
first token; with left padding (dev) the leading pads see no key at all, and PyTorch's SDPA returns 0
for such rows (its "safe softmax"), the same call transformers makes.

Attribute names are the Hugging Face checkpoint keys of `Qwen3ForCausalLM` / `MistralForCausalLM`
(`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ...); `Mistral3ForConditionalGeneration`
files hold the same text stack under `language_model.model.` (the original layout, which transformers 5
still writes) or `model.language_model.` (its in-memory names since 4.52): the loader (convert/llm.py)
takes the stack from under either prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .layers import WeightsModule
from .t5 import T5LayerNorm  # fp32 RMS, cast back, then the weight (`weight`): as Qwen3RMSNorm / MistralRMSNorm

ARCHS = ("qwen3", "mistral")
# FLUX.2's layers (BFL flux2 `text_encoder.py`: OUTPUT_LAYERS_QWEN3, OUTPUT_LAYERS_MISTRAL)
FLUX2_OUT_LAYERS = {"qwen3": (9, 18, 27), "mistral": (10, 20, 30)}


@dataclass(frozen=True)
class LLMConfig:
    """The text stack's shape, as its HF `config.json` gives it (`text_config` for Mistral3), plus the layers used.

    num_hidden_layers is the full model's depth (the file's); `depth = max(out_layers)` layers are built.
    """

    family: ClassVar[str] = "llm"
    arch: str = "qwen3"  # "qwen3" (q/k norms) or "mistral"
    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    out_layers: tuple[int, ...] = (9, 18, 27)  # indices into transformers' hidden_states, in output order

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unsupported LLM arch {self.arch!r}: expected one of {', '.join(ARCHS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if not self.out_layers:
            raise ValueError("out_layers is empty: choose at least one hidden state")
        bad = [i for i in self.out_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            # index num_hidden_layers would be transformers' final-normed output, which FLUX.2 never uses
            raise ValueError(
                f"out_layers {bad} out of range: indices into hidden_states must be in "
                f"[0, {self.num_hidden_layers - 1}] "
                f"for a {self.num_hidden_layers}-layer model (the last, final-normed state is not supported)"
            )

    @property
    def depth(self) -> int:
        """How many decoder layers run: the deepest hidden state used."""
        return max(self.out_layers)

    @property
    def out_dim(self) -> int:
        """Width of the context: one hidden state per chosen layer, concatenated."""
        return len(self.out_layers) * self.hidden_size

    def tiny(self) -> "LLMConfig":
        """Same layout, narrow: for tests (hidden 64, 4 query / 2 k-v heads of 16, 6 layers, 3 used)."""
        return replace(
            self, vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, out_layers=(2, 4, 5),
        )


# Facts: the official config.json files (Qwen/Qwen3-4B, Qwen/Qwen3-8B, the `text_config` of
# mistralai/Mistral-Small-3.1-24B-Instruct-2503 / 3.2-24B-Instruct-2506, which share the text stack).
LLM_PRESETS = {
    "qwen3-4b": LLMConfig(),
    "qwen3-8b": LLMConfig(hidden_size=4096, intermediate_size=12288),
    "mistral-small-3.1": LLMConfig(
        arch="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
        rope_theta=1_000_000_000.0, rms_norm_eps=1e-5, out_layers=FLUX2_OUT_LAYERS["mistral"],
    ),
}


def rope_cos_sin(length: int, head_dim: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """cos and sin of the angles `position * theta^(-2i/d)`, positions 0..length-1: each (length, d/2), fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq  # (L, d/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[i], x[i + d/2]) by angle i. x: (B, H, L, d); cos, sin: (L, d/2).

    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); the tables are cast to x's dtype first, as transformers does.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class SelfAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE (and Qwen3's per-head RMS norms of q and k)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        d, h, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)
        if cfg.arch == "qwen3":
            self.q_norm = T5LayerNorm(d, cfg.rms_norm_eps)
            self.k_norm = T5LayerNorm(d, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        """x (B, L, D); mask (B, 1, L, L) bool, True = may attend (None: plain causal)."""
        d = self.cfg.head_dim
        q = rearrange(self.q_proj(x), "b l (h d) -> b h l d", d=d)
        k = rearrange(self.k_proj(x), "b l (h d) -> b h l d", d=d)
        v = rearrange(self.v_proj(x), "b l (h d) -> b h l d", d=d)
        if self.cfg.arch == "qwen3":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        groups = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, L, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (B, H, L, d)
        return self.o_proj(rearrange(out, "b h l d -> b l (h d)"))


class MLP(nn.Module):
    """SwiGLU: `down_proj(silu(gate_proj x) * up_proj x)`."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = T5LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = T5LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)  # (B, L, D)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextStack(nn.Module):
    """The `model.` part of a causal LM: the embedding and the first `depth` decoder layers (no final norm)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.depth))


def attention_mask_4d(attention_mask: Tensor) -> Tensor:
    """(B, L) 1 = token, 0 = pad -> (B, 1, L, L) bool: query i may attend key j iff j <= i and j is a token."""
    L = attention_mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=attention_mask.device).tril()  # (L, L)
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


class LLMEncoder(WeightsModule):
    """`enc(input_ids (B, L), attention_mask (B, L) or None) -> (B, L, len(out_layers) * hidden_size)`.

    The hidden states after the layers `cfg.out_layers` (0 = embeddings), concatenated per token in that
    order, in the weights' dtype. attention_mask None: no padding (plain causal attention).
    """

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = TextStack(cfg)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        cfg = self.cfg
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {list(attention_mask.shape)} does not match input_ids {list(input_ids.shape)}"
            )
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask_4d(attention_mask)
        cos, sin = rope_cos_sin(input_ids.shape[1], cfg.head_dim, cfg.rope_theta, input_ids.device)
        x = self.model.embed_tokens(input_ids)  # (B, L, D): hidden_states[0]
        kept = {0: x} if 0 in cfg.out_layers else {}
        for i, layer in enumerate(self.model.layers, start=1):
            x = layer(x, cos, sin, mask)  # hidden_states[i]
            if i in cfg.out_layers:
                kept[i] = x
        return torch.cat([kept[i] for i in cfg.out_layers], dim=-1)  # (B, L, n D)


def preset(name: str, **fields) -> LLMConfig:
    """A preset (`LLM_PRESETS`), with some fields replaced (e.g. other `out_layers`)."""
    if name not in LLM_PRESETS:
        raise ValueError(f"unknown LLM preset {name!r}; known: {', '.join(LLM_PRESETS)}")
    return replace(LLM_PRESETS[name], **fields)
