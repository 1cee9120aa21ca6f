"""Tiny random checkpoints in the official layouts, and the tolerance measure of the tests.

The BFL -> Diffusers FLUX rules (the reference the loaders under test are compared with) live in
benchmarks/diffusers_flux.py, shared with the step-time benchmark; they are re-exported here.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import torch

from benchmarks.diffusers_flux import diffusers_flux, flux_bfl_to_diffusers  # noqa: F401 (re-exported)
from mmdit.flux import PRESETS, Flux, FluxParams

# FLUX-dev's tiny layout (head_dim 128, RoPE axes 16/56/56) with narrow text inputs
TINY_FLUX = replace(PRESETS["flux-dev"].tiny(), vec_in_dim=32, context_in_dim=64)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm scales around 1), so no weight can be silently ignored."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif re.search(r"(scale|norm.*weight|ln_.\.weight)$", name):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def flux_state(params: FluxParams = TINY_FLUX, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random FLUX state dict in the BFL layout (float32)."""
    return {k: v.clone() for k, v in randomize_(Flux(params), seed).state_dict().items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the project's float32 tolerance is 1e-4."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
