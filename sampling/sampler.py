"""The sampler: `denoise`, one loop over the noise levels, each step a few model calls and an Euler step.

The models predict the velocity `v = noise - image` of the straight path `x_t = t noise + (1 - t) image`
(rectified flow; SD3 paper, arXiv 2403.03206, section 2), so one Euler step from t to t_next is
`x + (t_next - t) v` (BFL flux `src/flux/sampling.py` `denoise`). In each step, in this order:
- TACA: the temperature for this noise level (sampling/taca.py; None is plain attention);
- the LoRA gate: in a run given a temperature, every LoRA adapter is off in the steps where it is
  None, as TACA's authors use their LoRA only in the steps with TACA on (Vchitect/TACA
  `infer/pipeline_taca_flux.py`, `if i < 3`); a run without a temperature leaves the adapters as they are;
- the model call(s), with the guidance (`Guidance`):
  - distilled (FLUX-dev): the scale is an input of the model (`guidance=[B]`);
  - classifier-free (SD3/3.5; FLUX's optional "true CFG"): the negative and positive prompts run in
    one batch [negative | positive] and `v = v_neg + cfg (v_pos - v_neg)` (Diffusers
    `pipelines/flux/pipeline_flux.py`, `true_cfg_scale`; SAI sd3.5 `sd3_impls.py` `CFGDenoiser`);
  - skip-layer guidance (SD3/3.5, on top of CFG, in a window of steps): a third branch, the positive
    prompts with some joint blocks skipped, and `v += scale (v_pos - v_skip)` (Diffusers
    `pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py`, `skip_guidance_layers`);
- the Euler step.
TACA's temperature and the LoRA gate act on every branch alike. After each step a flag on the device
counts the steps whose latents were still finite; it is read once, at the end, so that NaN or Inf
(non-finite weights, an overflow) is an error naming its first step, never a black image.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmdit.lora import lora_enabled

from .taca import TemperatureSpec, repeat_for_batch, temperature_at


class NonFiniteError(FloatingPointError):
    """NaN or Inf where a run needs numbers: the message says where they appeared and what to check."""


def all_finite(*tensors: Tensor | None) -> bool:
    """True unless a tensor holds NaN or Inf (one read from the device; None and meta tensors pass)."""
    return all(t is None or t.device.type == "meta" or bool(t.isfinite().all()) for t in tensors)


@dataclass(frozen=True)
class Conditioning:
    """What the transformer receives about the prompts."""

    context: Tensor  # (B, L, D_context)
    pooled: Tensor | None  # (B, D_pooled); None for FLUX.2, which has no pooled vector
    # more inputs of every call, the same for each CFG branch: FLUX.2's reference images, {"ref_latents": [...]}
    model_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SkipLayerGuidance:
    """SLG: at the noise levels `at`, `scale (v_pos - v_skip)` is added to the CFG velocity, v_skip being
    the positive branch run with the joint blocks `layers` skipped (the SD3 model's `skip_layers`)."""

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


@dataclass(frozen=True)
class Guidance:
    """How the prompts steer the velocity; the defaults are none at all (the model's velocity as is)."""

    distilled: float | None = None  # FLUX-dev: the guidance scale, an input of the model
    negative: Conditioning | None = None  # classifier-free guidance: the negative prompts (None: no CFG)
    cfg: float = 1.0  # its scale: v_neg + cfg (v_pos - v_neg)
    slg: SkipLayerGuidance | None = None  # skip-layer guidance, on top of CFG

    def __post_init__(self):
        if self.slg is not None and self.negative is None:
            raise ValueError("skip-layer guidance works on top of classifier-free guidance: give a CFG scale > 1")


def denoise(
    model: nn.Module,
    x: Tensor,
    sigmas: Tensor,
    cond: Conditioning,
    guidance: Guidance = Guidance(),
    temperature: TemperatureSpec = None,
    gate_lora: bool = True,
    progress: bool = False,
) -> Tensor:
    """Integrate the guided velocity from sigmas[0] down to sigmas[-1]: x (B, C, h, w) float32, noise at
    sigmas[0] -> the latents. sigmas: (N + 1,), on the CPU, so that every per-step decision (TACA's
    schedule, the LoRA gate, SLG's window) reads a host number and a GPU never waits between steps.
    temperature: TACA's, a number, a [2, 2] / [B, H, 2, 2] matrix or a function of t (sampling/taca.py).
    Raises NonFiniteError, naming the first step, if the latents become NaN or Inf.
    """
    B, neg, slg = x.shape[0], guidance.negative, guidance.slg
    context, pooled = cond.context, cond.pooled
    if neg is not None:  # CFG: one batch [negative | positive]
        context = torch.cat((neg.context, context))
        pooled = None if pooled is None else torch.cat((neg.pooled, pooled))
    n = context.shape[0]  # B, or 2B with CFG
    g = None if guidance.distilled is None else torch.full((n,), float(guidance.distilled), device=x.device)
    gate_lora = gate_lora and temperature is not None  # a run without TACA leaves any LoRA as it is
    finite = torch.zeros((), dtype=torch.int64, device=x.device)  # steps after which x was still finite
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc="sampling"):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        temp = temperature_at(temperature, t)  # None: plain attention in this step
        ts = torch.full((n,), t, device=x.device)  # a fill, not a copy: no sync for a host t
        with lora_enabled(model, False) if gate_lora and temp is None else nullcontext():
            v = model(torch.cat([x] * (n // B)), ts, context, pooled, guidance=g,
                      temperature=repeat_for_batch(temp, n // B), **cond.model_kwargs).float()  # (n, C, h, w)
            if neg is not None:
                v_neg, v_pos = v.chunk(2)
                v = v_neg + guidance.cfg * (v_pos - v_neg)
                if slg is not None and t in slg.at:  # the positive branch alone (B), blocks skipped
                    v_skip = model(x, ts[:B], cond.context, cond.pooled, temperature=temp, skip_layers=slg.layers)
                    v = v + slg.scale * (v_pos - v_skip.float())
        x = x + (t_next - t) * v
        finite += x.isfinite().all()  # on the device: no wait; NaN and Inf stay, so this counts the steps before
    if x.device.type != "meta" and (k := int(finite)) < len(sigmas) - 1:  # the one read, after the loop
        raise NonFiniteError(
            f"the latents became NaN or Inf in step {k + 1} of {len(sigmas) - 1} (t = {float(sigmas[k]):.4g}): "
            "check the weights of the model and of any LoRA, the guidance and TACA values, or compute in float32"
        )
    return x
