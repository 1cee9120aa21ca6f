"""Flow-matching noise schedules: the noise levels `t` (sigma) visited by the sampler, from 1 down to 0.

Both families shift a uniform grid toward high noise with one formula:

    shift(t) = s * t / (1 + (s - 1) * t)

FLUX writes it `exp(mu) / (exp(mu) + (1/t - 1))` (BFL flux `src/flux/sampling.py` `time_shift`), the
same thing with `s = exp(mu)`, where `mu` grows linearly with the image token count (0.5 at 256
tokens, 1.15 at 4096: `get_lin_function`); schnell is not shifted. SD3 uses a fixed `s = 3.0` (SAI
sd3.5 `sd3_infer.py`, `SHIFT = 3.0`). The grids are Diffusers' (`schedulers/
scheduling_flow_match_euler_discrete.py`, `FlowMatchEulerDiscreteScheduler`): FLUX shifts
`linspace(1, 1/N, N)` (`pipelines/flux/pipeline_flux.py`); SD3 shifts `linspace(sigma_max, sigma_min, N)`
where sigma_min is the shifted smallest training level t = 1/1000, so SD3's grid is shifted twice, as
in SAI's `sd3_impls.py` and Diffusers' code. Every schedule returned here ends with 0 and has N + 1
entries for N steps.

Your own levels: Diffusers' `pipe(sigmas=...)` shifts the given levels with the model's shift (exp(mu)
for FLUX-dev at that image size, 3.0 for SD3, none for schnell) before using them
(`FlowMatchEulerDiscreteScheduler.set_timesteps`); `given_sigmas(levels, shift)` does the same, and with
the default shift of 1 takes them as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .limits import MAX_STEPS

SD3_SHIFT = 3.0  # every released SD3/SD3.5 model
NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(t: Tensor, shift: float) -> Tensor:
    """`s t / (1 + (s - 1) t)`: s > 1 spends more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def flux_mu(image_seq_len: int, base_len: int = 256, max_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's log-shift, linear in the number of packed image tokens."""
    m = (max_shift - base_shift) / (max_len - base_len)
    return base_shift + m * (image_seq_len - base_len)


def _with_zero(sigmas: Tensor) -> Tensor:
    return torch.cat((sigmas.float(), torch.zeros(1)))


def flux_sigmas(steps: int, image_seq_len: int, shifted: bool = True) -> Tensor:
    """FLUX: `linspace(1, 1/N, N)`, shifted by exp(mu) (dev) or not (schnell), then 0. (N + 1,) float32."""
    _check_steps(steps)
    t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return _with_zero(shift_sigmas(t, math.exp(flux_mu(image_seq_len))) if shifted else t)


def sd3_sigmas(steps: int, shift: float = SD3_SHIFT) -> Tensor:
    """SD3: `linspace(1, shift(1/1000), N)` shifted again, then 0. (N + 1,) float32."""
    _check_steps(steps)
    sigma_min = shift_sigmas(torch.tensor(1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float64), shift).item()
    t = torch.linspace(1.0, sigma_min, steps, dtype=torch.float64)
    return _with_zero(shift_sigmas(t, shift))


def given_sigmas(sigmas: Sequence[float] | Tensor, shift: float = 1.0) -> Tensor:
    """The user's own noise levels (decreasing, in (0, 1]; a final 0 is dropped), shifted by `shift`
    (`shift_sigmas`; 1: as they are), then 0: (N + 1,) float32. At most `MAX_STEPS` levels."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if s.numel() and s[-1] == 0:
        s = s[:-1]
    if not s.numel():
        raise ValueError("sigmas: give at least one noise level in (0, 1]")
    if not ((s > 0) & (s <= 1)).all() or (s[1:] >= s[:-1]).any():  # NaN fails the first test
        raise ValueError(f"sigmas must decrease strictly and lie in (0, 1], got {s.tolist()}")
    _check_steps(s.numel())
    return _with_zero(shift_sigmas(s, shift))


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if steps > MAX_STEPS:
        raise ValueError(f"steps must be at most {MAX_STEPS}, got {steps}")
