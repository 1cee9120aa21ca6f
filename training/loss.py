"""The rectified-flow objective, with TACA's temperature in the forward as at sampling.

    x_t = (1 - t) x0 + t eps,    loss = mean || v(x_t, t, c; temperature(t)) - (eps - x0) ||^2

(t = 1 is pure noise, as everywhere in this project; the models predict v = eps - x0.) The paper trains
only where TACA acts: t ~ U[t_min, 1] with t_min = 0.97 (model timestep >= 970); logit-normal (SD3's
`sigmoid(N(0, 1))`) and uniform sampling are there for other uses. The temperature of each sample
is the sampler's schedule at its own t (sampling/taca.py), so one batch may mix gamma and plain
attention: it is then passed per sample as `[B, H|1, 2, 2]`. Deviation: no loss weighting over t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdit.attention import Temperature, as_temperature_matrix
from sampling.taca import TemperatureSpec, temperature_at

from .config import TIMESTEP_SAMPLING


def sample_t(kind: str, t_min: float, g: torch.Generator) -> Tensor:
    """One noise level in [0, 1] (float32, shape (1,)) drawn from `g`."""
    if kind == "window":
        return t_min + (1 - t_min) * torch.rand(1, generator=g)
    if kind == "logit-normal":
        return torch.sigmoid(torch.randn(1, generator=g))
    if kind == "uniform":
        return torch.rand(1, generator=g)
    raise ValueError(f"unknown timestep sampling {kind!r}: {', '.join(TIMESTEP_SAMPLING)}")


def batch_temperature(spec: TemperatureSpec, t: Tensor) -> Temperature:
    """The temperature of a batch with noise levels t (B,): None or one value when all samples agree,
    else per sample `[B, H|1, 2, 2]` (plain attention = a matrix of ones)."""
    values = [temperature_at(spec, ti) for ti in t.tolist()]
    if all(v is None for v in values):
        return None
    if all(not isinstance(v, Tensor) for v in values) and len(set(values)) == 1:
        return values[0]
    mats = [as_temperature_matrix(1.0 if v is None else v) for v in values]  # (1, H|1, 2, 2) each
    heads = max(m.shape[1] for m in mats)
    return torch.cat([m.expand(1, heads, 2, 2) for m in mats]).to(t.device)


def flow_matching_loss(model: nn.Module, x0: Tensor, noise: Tensor, t: Tensor, context: Tensor, pooled: Tensor,
                       guidance: Tensor | None = None, temperature: Temperature = None) -> Tensor:
    """Mean squared error of the velocity (float32 scalar). x0, noise: (B, C, h, w) latents (C: 16 for FLUX.1
    and SD3, 128 for FLUX.2); t: (B,)."""
    x0, noise = x0.float(), noise.float()
    tt = t.float().view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise  # (B, C, h, w)
    v = model(x_t, t, context, pooled, guidance=guidance, temperature=temperature)
    return F.mse_loss(v.float(), noise - x0)
