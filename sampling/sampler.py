"""The flow-matching Euler sampler and the guided velocity it integrates.

The models predict the velocity `v = noise - image` of the straight path `x_t = t noise + (1 - t) image`,
so one Euler step from t to t_next is `x + (t_next - t) v`. Guidance:
- distilled (FLUX-dev): the scale is an input of the model (`guidance=[B]`);
- classifier-free (SD3/3.5, optionally FLUX as `true_cfg`): the negative and positive branches run in
  one batch and `v = v_neg + cfg (v_pos - v_neg)`.
TACA's temperature and the LoRA gate are resolved per step from the noise level (sampling/taca.py);
the gate acts only in a run given a temperature, so a LoRA used without TACA stays on throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .taca import TemperatureSpec, lora_gate, repeat_for_batch, temperature_at

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x, t) -> v


@dataclass
class Conditioning:
    """What the transformer receives about the prompt."""

    context: Tensor  # (B, L, D_context)
    pooled: Tensor  # (B, D_pooled)


def euler(velocity: Velocity, x: Tensor, sigmas: Tensor, progress: bool = False) -> Tensor:
    """Integrate from sigmas[0] down to sigmas[-1]. x: (B, C, h, w), sigmas: (N + 1,)."""
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc="sampling"):
        t, t_next = sigmas[i], sigmas[i + 1]
        x = x + (t_next - t) * velocity(x, t)
    return x


def guided_velocity(
    model: nn.Module,
    cond: Conditioning,
    negative: Conditioning | None = None,
    cfg: float = 1.0,
    guidance: float | None = None,
    temperature: TemperatureSpec = None,
    gate_lora: bool = True,
) -> Velocity:
    """The velocity the sampler follows (float32): the model with its guidance, CFG, and per-step TACA."""
    B = cond.context.shape[0]
    if negative is not None:  # one batch: [negative | positive]
        context = torch.cat((negative.context, cond.context))
        pooled = torch.cat((negative.pooled, cond.pooled))
    else:
        context, pooled = cond.context, cond.pooled
    n = context.shape[0]
    gate_lora = gate_lora and temperature is not None  # a run without TACA leaves any LoRA as it is
    g = None if guidance is None else torch.full((n,), float(guidance), device=context.device)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        temp = temperature_at(temperature, t)
        xs = torch.cat([x] * (n // B))
        ts = t.to(x.device, torch.float32).expand(n)
        with lora_gate(model, temp is not None or not gate_lora):
            v = model(xs, ts, context, pooled, guidance=g, temperature=repeat_for_batch(temp, n // B))
        if negative is None:
            return v.float()
        v_neg, v_pos = v.float().chunk(2)
        return v_neg + cfg * (v_pos - v_neg)

    return velocity
