"""The flow-matching Euler sampler and the guided velocity it integrates.

The models predict the velocity `v = noise - image` of the straight path `x_t = t noise + (1 - t) image`,
so one Euler step from t to t_next is `x + (t_next - t) v`. Guidance:
- distilled (FLUX-dev): the scale is an input of the model (`guidance=[B]`);
- classifier-free (SD3/3.5, optionally FLUX as `true_cfg`): the negative and positive branches run in
  one batch and `v = v_neg + cfg (v_pos - v_neg)`;
- skip-layer guidance (SD3/3.5, on top of CFG, in a window of steps): a third branch, the positive one
  with some joint blocks skipped, pushes away from it: `v += slg (v_pos - v_skip)`.
TACA's temperature and the LoRA gate are resolved per step from the noise level (sampling/taca.py),
and act on every branch alike; the gate acts only in a run given a temperature, so a LoRA used without
TACA stays on throughout.
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


@dataclass(frozen=True)
class SkipLayerGuidance:
    """SLG: at the noise levels `at`, `scale (v_pos - v_skip)` is added to the CFG velocity, v_skip being
    the positive branch run with the joint blocks `layers` skipped (SD3's `skip_layers`)."""

    layers: tuple[int, ...]
    scale: float = 2.8
    at: frozenset[float] = frozenset()  # the noise levels t of the steps where it applies (`slg_window`)


def slg_window(sigmas: Tensor, start: float = 0.01, stop: float = 0.2) -> frozenset[float]:
    """The noise levels of the steps where Diffusers applies SLG, for any schedule sigmas: (N + 1,).

    Step i of N (0-based) is in when `N * start < i < N * stop`, both strict: with the defaults, none
    of N <= 5 steps, step 1 of 6, steps 1 to 5 of 28.
    """
    n = len(sigmas) - 1
    return frozenset(float(sigmas[i]) for i in range(n) if n * start < i < n * stop)


def combine(v_neg: Tensor, v_pos: Tensor, cfg: float, v_skip: Tensor | None = None, slg: float = 0.0) -> Tensor:
    """CFG, then (given v_skip) SLG's term, in Diffusers' order. Every v: (B, C, h, w)."""
    v = v_neg + cfg * (v_pos - v_neg)
    if v_skip is not None:
        v = v + slg * (v_pos - v_skip)
    return v


def euler(velocity: Velocity, x: Tensor, sigmas: Tensor, progress: bool = False) -> Tensor:
    """Integrate from sigmas[0] down to sigmas[-1]. x: (B, C, h, w), sigmas: (N + 1,).

    Keep sigmas on the CPU: then every per-step decision (TACA's schedule, the LoRA gate, SLG's window)
    reads a host number, and a GPU run never waits for the device between steps.
    """
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
    slg: SkipLayerGuidance | None = None,
) -> Velocity:
    """The velocity the sampler follows (float32): the model with its guidance, CFG, SLG and per-step TACA."""
    if slg is not None and negative is None:
        raise ValueError("skip-layer guidance works on top of classifier-free guidance: give a CFG scale > 1")
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
        ts = torch.full((n,), float(t), device=x.device)  # a fill, not a copy: no sync for a host t
        v_skip = None
        with lora_gate(model, temp is not None or not gate_lora):
            v = model(xs, ts, context, pooled, guidance=g, temperature=repeat_for_batch(temp, n // B))
            if slg is not None and float(t) in slg.at:  # the positive branch alone (B), blocks skipped
                v_skip = model(x, ts[:B], cond.context, cond.pooled, temperature=temp, skip_layers=slg.layers).float()
        if negative is None:
            return v.float()
        v_neg, v_pos = v.float().chunk(2)
        return combine(v_neg, v_pos, cfg, v_skip, slg.scale if slg else 0.0)

    return velocity
