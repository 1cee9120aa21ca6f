"""FLUX.2 text to image and editing: `Flux2Pipeline`, its schedule and its reference images.

What the three family specifics of sampling/pipeline.py are for FLUX.2 (Diffusers 0.42.1
`pipelines/flux2/pipeline_flux2.py` for [dev], `pipeline_flux2_klein.py` for [klein]; BFL flux2
`src/flux2/sampling.py`):
- `encode_prompt`: one LLM, its chat-formatted prompt padded to 512 tokens, three hidden states
  stacked per token (convert/llm.py, mmdit/chat_tokenizer.py); no pooled vector.
- `sigmas`: `linspace(1, 1/N, N)` shifted by `exp(mu)` (sampling/schedules.py `shift_sigmas`) with
  the empirical mu of BFL, a function of the image token count *and* the step count (`empirical_mu`).
  Your own `sigmas=` are shifted the same way, as Diffusers' `pipe(sigmas=...)` does; mu then uses
  `steps` (Diffusers: `num_inference_steps`).
- `guidance_for`: [dev] takes the guidance scale as an input (guidance-distilled, 4.0) and no negative
  prompt (Diffusers' `Flux2Pipeline` has none); [klein] base runs classifier-free guidance when the
  scale is > 1, with a negative prompt ("" by default, Diffusers' `negative_prompt_embeds`), both
  branches in one batch [negative | positive] (Diffusers runs two forwards: the same result); [klein]
  distilled has no guidance at all: a scale > 1 (or a negative prompt) is ignored with a warning, as
  Diffusers does, and `mmdit sample` neither applies nor records it (`inert`). Distilled or base: a folder's model_index.json `is_distilled` (Diffusers' own flag,
  False when absent) wins; a single file goes by its name (`flux-2-klein-base-4b.safetensors` is the
  base model), the only hint there is, as for SD3.5 Large vs Large Turbo (`is_distilled`).
The sampler's latents are the autoencoder's latents (B, 32, H/8, W/8) in its *normalized* space:
patchified 2x2 to 128 channels, `(x - running_mean) / sqrt(running_var + eps)`, unpatchified. Noise
is drawn there (Diffusers' `latents=` is `_patchify_latents(noise)`), and at the end the latents are
de-normalized (`autoencoder_latents`) before `output="latent"` returns them or the decoder runs. For
[dev] this is also what `output="latent"` gives (Diffusers' `Flux2Pipeline` returns its packed,
normalized tokens instead; [klein]'s returns these).

Editing (`generate(images=[...])`): each reference image is capped at 1 MP (LANCZOS), floored to a
multiple of 16 pixels by a center crop, encoded with the posterior mean, normalized like the noise,
and attended to as image tokens at positions (10 + 10 i, row, col, 0) after the output's tokens
(mmdit/flux2.py); TACA counts them as image tokens. The output takes the first reference's size where
height or width is not given; Diffusers 0.42.1 does the same (`height = height or image_height` in its
loop keeps the first). mu counts the output's tokens only.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from mmdit.autoencoder_flux2 import patchify, unpatchify

from .parts import model_index
from .pipeline import Defaults, Pipeline, as_prompts, negatives
from .sampler import Conditioning, Guidance
from .schedules import given_sigmas

# Sampling defaults (steps, guidance, side), by kind:
# - [dev]: Diffusers `Flux2Pipeline.__call__` (50 steps, guidance_scale 4.0) = BFL flux2 `scripts/cli.py` `Config`;
# - [klein] base: Diffusers `Flux2KleinPipeline.__call__` (50, 4.0; its docstring example on klein-base-9B),
#   BFL flux2 README ("Base (50-step)");
# - [klein] distilled: BFL flux2 README ("Distilled (4-step)"), no CFG (Diffusers ignores the scale, hence 1.0).
# Side: Diffusers' `default_sample_size` 128 x the autoencoder's 8.
DEFAULTS = {
    "flux2-dev": Defaults(50, 4.0),
    "flux2-klein-base": Defaults(50, 4.0),
    "flux2-klein": Defaults(4, 1.0),
}
REFERENCE_MAX_AREA = 1024 * 1024  # pixels (Diffusers `Flux2ImageProcessor._resize_to_target_area`)
REFERENCE_MIN_SIDE, REFERENCE_MAX_ASPECT = 64, 8  # Diffusers `Flux2ImageProcessor.check_image_input`


# ---- the schedule ----


def empirical_mu(image_seq_len: int, steps: int) -> float:
    """BFL's log-shift for FLUX.2: linear in the image token count, interpolated between fits at 10 and 200
    steps (beyond 4300 tokens, the 200-step fit alone). BFL flux2 `sampling.py` `compute_empirical_mu`
    (= Diffusers' `compute_empirical_mu`)."""
    a1, b1 = 8.73809524e-05, 1.89833333  # the 10-step fit
    a2, b2 = 0.00016927, 0.45666666  # the 200-step fit
    mu_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return mu_200
    mu_10 = a1 * image_seq_len + b1
    slope = (mu_200 - mu_10) / 190.0  # per step, through (10, mu_10) and (200, mu_200)
    return slope * steps + (mu_200 - 200.0 * slope)


def flux2_sigmas(steps: int, image_seq_len: int) -> Tensor:
    """FLUX.2's noise levels: `linspace(1, 1/N, N)` shifted by `exp(empirical_mu(image_seq_len, steps))`,
    then 0. (N + 1,) float32 on the CPU. Diffusers: the scheduler's `set_timesteps(sigmas=..., mu=...)`
    with `use_dynamic_shifting` (FLUX.1-dev's scheduler config)."""
    t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return given_sigmas(t, math.exp(empirical_mu(image_seq_len, steps)))


# ---- reference images ----


def reference_image(image: Image.Image, multiple: int = 16) -> Image.Image:
    """A reference image as FLUX.2 takes it: at most 1 MP (LANCZOS, aspect kept), then center-cropped to
    multiples of `multiple` pixels, RGB. Diffusers `Flux2KleinPipeline.__call__` step 4, `Flux2ImageProcessor`;
    BFL flux2 `sampling.py` `default_prep`. Too small (< 64 px) or too elongated (> 8:1): ValueError."""
    w, h = image.size
    if min(w, h) < REFERENCE_MIN_SIDE:
        raise ValueError(f"reference image too small: {w}x{h} (each side at least {REFERENCE_MIN_SIDE} px)")
    if max(w / h, h / w) > REFERENCE_MAX_ASPECT:
        raise ValueError(f"reference image too elongated: {w}x{h} (at most {REFERENCE_MAX_ASPECT}:1)")
    if w * h > REFERENCE_MAX_AREA:
        s = math.sqrt(REFERENCE_MAX_AREA / (w * h))
        image = image.resize((int(w * s), int(h * s)), Image.Resampling.LANCZOS)
        w, h = image.size
    W, H = w // multiple * multiple, h // multiple * multiple
    left, top = (w - W) // 2, (h - H) // 2
    return image.crop((left, top, left + W, top + H)).convert("RGB")


def image_to_tensor(image: Image.Image) -> Tensor:
    """An RGB image as (1, 3, H, W) in [-1, 1], float32 (8-bit values / 255, then 2x - 1, as Diffusers)."""
    hwc = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    return hwc.permute(2, 0, 1)[None].float() / 255 * 2 - 1


# ---- distilled or base ----


def is_distilled(source: Path) -> bool:
    """[klein]: step-distilled (4 steps, no CFG) or base. A folder's model_index.json `is_distilled` wins
    (Diffusers' `Flux2KleinPipeline` flag, False when absent); a single file goes by its name: BFL's
    `flux-2-klein-base-4b.safetensors` is the base model, `flux-2-klein-4b.safetensors` the distilled one."""
    index = model_index(source)
    if index:
        return bool(index.get("is_distilled", False))
    return "base" not in source.name.lower()


# ---- the pipeline ----


class Flux2Pipeline(Pipeline):
    """FLUX.2 [dev] and [klein]: the parts (transformer, FLUX.2 autoencoder, `encoders["llm"]`,
    `tokenizers["llm"]`, a chat tokenizer) and `generate`, with `images=` for editing.

    distilled ([klein] only): step-distilled (no CFG) or base; see `is_distilled`. `pipe.variant` adds
    "base" for the latter: "flux2-klein-base-4b", "flux2-klein-base-like (custom size)".
    """

    family = "flux2"

    def __init__(self, *args, distilled: bool = False, defaults: Defaults | None = None, **kwargs):
        super().__init__(*args, defaults=defaults, **kwargs)
        p = self.transformer.params
        self.klein = not p.guidance_embed  # [dev] has the guidance embedding, [klein] not
        self.distilled = self.klein and distilled
        if self.klein and not distilled:
            self.variant = self.variant.replace("flux2-klein", "flux2-klein-base", 1)
        kind = "flux2-dev" if not self.klein else "flux2-klein" if distilled else "flux2-klein-base"
        self.defaults = defaults or DEFAULTS[kind]

    def encode_prompt(self, prompts: str | list[str]) -> tuple[Tensor, None]:
        """(context (B, 512, 3 D_llm), None): the LLM's stacked hidden states = Diffusers' `prompt_embeds`."""
        enc, tok = self.encoders["llm"], self.tokenizers["llm"]
        ids, mask = tok(as_prompts(prompts))  # (B, 512) each
        with torch.no_grad(), self._running(enc):
            context = enc(ids.to(self.device), mask.to(self.device))
        return context, None

    def sigmas(self, steps: int, latent_h: int, latent_w: int) -> Tensor:
        return flux2_sigmas(steps, (latent_h // 2) * (latent_w // 2))

    def shift(self, latent_h: int, latent_w: int, steps: int) -> float:
        # Diffusers: user sigmas are shifted with the mu of the image size and `num_inference_steps`
        return math.exp(empirical_mu((latent_h // 2) * (latent_w // 2), steps))

    def guidance_for(self, prompts, guidance, negative_prompt, true_cfg) -> Guidance:
        if not self.klein:  # [dev]: the distilled scale is an input of the model
            if negative_prompt is not None:
                raise ValueError("FLUX.2 [dev] is guidance-distilled and takes no negative prompt "
                                 "(Diffusers' Flux2Pipeline has none): use the guidance scale")
            return Guidance(distilled=guidance)
        if self.distilled:  # no CFG: a scale or negative prompt given is `inert` (generate warns, as Diffusers)
            return Guidance()
        if guidance <= 1:  # base [klein] without CFG (the negative prompt unused, as for SD3)
            return Guidance()
        negative = Conditioning(*self.encode_prompt(negatives(negative_prompt or "", len(prompts))))
        return Guidance(negative=negative, cfg=guidance)

    def inert(self, guidance, negative_prompt, true_cfg) -> dict[str, str]:
        out = {}
        if true_cfg != 1:
            out["true_cfg"] = "FLUX.2 has no true CFG (the base [klein]'s CFG scale is the guidance scale)"
        if self.distilled:
            if guidance is not None:
                out["guidance"] = "this FLUX.2 [klein] is step-distilled: it takes no guidance scale (no CFG)"
            if negative_prompt is not None:
                out["negative_prompt"] = "this FLUX.2 [klein] is step-distilled: no CFG, so no negative prompt"
        elif self.klein and negative_prompt is not None:
            cfg = self.defaults.guidance if guidance is None else guidance
            if cfg <= 1:
                out["negative_prompt"] = f"FLUX.2 [klein] uses a negative prompt only with CFG (a guidance scale above 1, here {cfg})"
        return out

    def reference_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) of a reference image as prepared (`reference_image`): the output's size if it is the first."""
        return reference_image(image, 2 * self.autoencoder.params.downscale).size

    def references(self, images: list[Image.Image]) -> list[Tensor]:
        """Each image prepared (`reference_image`), encoded (posterior mean) and normalized like the noise:
        (1, 32, H_i/8, W_i/8) latents in the sampler's space. Diffusers `prepare_image_latents`."""
        ae = self.autoencoder
        refs = []
        for image in images:
            pixels = image_to_tensor(reference_image(image, 2 * ae.params.downscale))  # (1, 3, H, W)
            with torch.no_grad(), self._running(ae):
                z = ae.encode(pixels.to(self.device, ae.dtype))  # (1, 32, H/8, W/8)
                refs.append(self.sampler_latents(z))
        return refs

    def autoencoder_latents(self, latents: Tensor) -> Tensor:
        """De-normalized in the patchified 128-channel space: `x * sqrt(running_var + eps) + running_mean`."""
        return unpatchify(self.autoencoder.denormalize(patchify(latents)))

    def sampler_latents(self, latents: Tensor) -> Tensor:
        """Normalized in the patchified 128-channel space: `(x - running_mean) / sqrt(running_var + eps)`
        (Diffusers `Flux2KleinPipeline._encode_vae_image`; Diffusers' FLUX.2 LoRA training,
        `examples/dreambooth/train_dreambooth_lora_flux2_klein.py`, learns in this space too)."""
        return unpatchify(self.autoencoder.normalize(patchify(latents)))


def prompt_format(encoder: nn.Module) -> str:
    """The chat formatting an LLM's prompts take (mmdit/chat_tokenizer.py): by its architecture, from its weights."""
    return {"qwen3": "flux2-klein", "mistral": "flux2-dev"}[encoder.cfg.arch]

