"""Random-weight checkpoints in the official layouts, for demos, benchmarks and tests.

`random_checkpoint("flux-dev", path)` writes what `flux1-dev.safetensors` would hold (bare BFL keys),
with random values; SD3 presets are written the SAI way (`model.diffusion_model.` prefix).
`tiny=True` keeps the layout and the input widths but shrinks depth and width.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from mmdit import build_model

from .families import FAMILIES
from .files import save_safetensors_atomic


def preset_params(name: str) -> tuple[str, object]:
    """The family and the params of a named preset (`flux-dev`, `sd3.5-large`, ...)."""
    for family, layout in FAMILIES.items():
        if name in layout.PRESETS:
            return family, layout.PRESETS[name]
    names = sorted(n for layout in FAMILIES.values() for n in layout.PRESETS)
    raise ValueError(f"unknown preset {name!r}; known: {', '.join(names)}")


def tiny(params, family: str):
    """Same family, layout and input widths; two blocks of each kind, head dims as in the real model.

    One of two tiny configs in the tree (the other: `SD3Params.tiny`); they become one `params.tiny()`.
    """
    if family == "flux":  # head_dim 128 keeps RoPE's (16, 56, 56)
        return dataclasses.replace(params, hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2)
    attn2 = (0,) if params.x_block_self_attn_layers else ()  # SD3: head_dim 64
    return dataclasses.replace(
        params, depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=32, x_block_self_attn_layers=attn2
    )


def build_random(params, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A random state dict for `params`, scaled like a trained net (unit-variance activations)."""
    with torch.device("meta"):
        model = build_model(params)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, ref in model.state_dict().items():
        if ref.dim() >= 2:
            t = torch.randn(ref.shape, generator=g, dtype=torch.float32) / math.sqrt(ref[0].numel())
        elif k.endswith(("scale", "norm.weight", "ln_q.weight", "ln_k.weight")):
            t = torch.ones(ref.shape)
        else:
            t = 0.02 * torch.randn(ref.shape, generator=g)
        out[k] = t.to(dtype)
    return out


def random_checkpoint(preset: str, path, dtype: torch.dtype = torch.bfloat16, tiny_size: bool = False, seed: int = 0):
    """Write a random checkpoint of `preset` in its official single-file layout; returns its params."""
    family, params = preset_params(preset)
    if tiny_size:
        params = tiny(params, family)
    sd = build_random(params, seed, dtype)
    if family == "sd3":  # SAI files carry the transformer under `model.diffusion_model.`; BFL's are bare
        sd = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    save_safetensors_atomic(sd, path, metadata={"note": f"random weights, {preset} layout"})
    return params
