"""Random-weight checkpoints in the official layouts, for demos, benchmarks and tests.

`random_checkpoint("flux-dev", path)` writes what `flux1-dev.safetensors` would hold (bare BFL keys),
with random values; SD3 presets are written the SAI way (`model.diffusion_model.` prefix).
`tiny_size=True` writes the preset's `params.tiny()`: the same layout and input widths, two blocks of each kind.
"""

from __future__ import annotations

import math

import torch

from mmdit import build_model

from .families import FAMILIES
from .files import save_safetensors_atomic


def preset_params(name: str):
    """The params of a named preset (`flux-dev`, `sd3.5-large`, ...), of any family."""
    for layout in FAMILIES.values():
        if name in layout.PRESETS:
            return layout.PRESETS[name]
    names = sorted(n for layout in FAMILIES.values() for n in layout.PRESETS)
    raise ValueError(f"unknown preset {name!r}; known: {', '.join(names)}")


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
    params = preset_params(preset)
    if tiny_size:
        params = params.tiny()
    sd = build_random(params, seed, dtype)
    if params.family == "sd3":  # SAI files carry the transformer under `model.diffusion_model.`; BFL's are bare
        sd = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    save_safetensors_atomic(sd, path, metadata={"note": f"random weights, {preset} layout"})
    return params
