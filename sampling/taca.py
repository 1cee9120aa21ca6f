"""TACA at sampling time: the temperature of each step.

The temperature of a run may be a number (the paper's gamma), a `[2, 2]` matrix or a per-sample
`[B, H, 2, 2]` one (see mmdit/attention.py), or a function of the noise level t in [0, 1] returning
either, or None. `TacaSchedule` is the paper's timestep-dependent gamma (arXiv 2506.07986): gamma0
while the model's timestep `1000 t` is at least 970, 1 after; with FLUX-dev at 30 steps and 1024x1024
that is the first three steps, the steps the authors' code treats (Vchitect/TACA
`infer/pipeline_taca_flux.py`, `if i < 3`). A temperature equal to 1 is passed to the model as None:
exactly plain attention, at no cost. The sampler (sampling/sampler.py) also gates a LoRA by it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mmdit.attention import Temperature

TemperatureSpec = Temperature | Callable[[float], Temperature]


@dataclass(frozen=True)
class TacaSchedule:
    """The paper's schedule: `gamma` while `t >= until` (the model's timestep `1000 t >= 970`), then plain attention."""

    gamma: float = 1.2
    until: float = 0.97

    def __post_init__(self):
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"TACA's gamma must be a finite number above 0 (paper: 1.2), got {self.gamma}")
        if not math.isfinite(self.until):  # NaN would silently turn TACA off (no t >= NaN)
            raise ValueError(f"TACA's until must be a finite noise level (paper: 0.97), got {self.until}")

    def __call__(self, t: float) -> float | None:
        return self.gamma if float(t) >= self.until else None


def is_plain(temperature: Temperature) -> bool:
    """True when the temperature leaves attention unchanged (None, 1, or a matrix of ones)."""
    if temperature is None:
        return True
    if isinstance(temperature, Tensor):
        return bool((temperature == 1).all())
    return float(temperature) == 1.0


def temperature_at(spec: TemperatureSpec, t: float) -> Temperature:
    """The temperature for noise level t, as the model takes it (None where it is 1)."""
    value = spec(float(t)) if callable(spec) else spec
    return None if is_plain(value) else value


def repeat_for_batch(temperature: Temperature, n: int) -> Temperature:
    """A per-sample temperature `[B, H, 2, 2]` repeated n times along the batch (for the CFG batch)."""
    if isinstance(temperature, Tensor) and temperature.dim() == 4 and temperature.shape[0] > 1:
        return torch.cat([temperature] * n)
    return temperature
