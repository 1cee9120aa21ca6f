"""Text to image with FLUX.1 and SD3/SD3.5: encode the prompts, denoise (sampling/sampler.py), decode.

`Pipeline` holds the parts (transformer, autoencoder, text encoders and tokenizers by role:
`clip_l`, `clip_g`, `t5`) and runs `generate`. A family is a small subclass saying three things:
what the transformer receives about a prompt (`encode_prompt`), which noise levels it visits
(`sigmas`, sampling/schedules.py) and how it is guided (`guidance_for`, a `Guidance`):
- FLUX (`FluxPipeline`): context = T5 states; pooled = CLIP-L's pooled state, unprojected (zeros for
  a model without CLIP, such as the tiny one in assets/tiny-flux); dev-type models take the distilled
  guidance scale as an input, schnell-type none; true CFG with a negative prompt is optional
  (`true_cfg`). BFL flux `src/flux/sampling.py` `prepare`; Diffusers `pipelines/flux/pipeline_flux.py`.
- SD3/SD3.5 (`SD3Pipeline`): CLIP-L and bigG penultimate states (no final norm) side by side,
  zero-padded to the transformer's context width, then the T5 states along the sequence (zeros where
  T5 is absent, as Diffusers does); pooled = both CLIP pooled vectors (projected when the encoder has a
  projection, as Diffusers' CLIPTextModelWithProjection). Classifier-free guidance with a negative
  prompt ("" by default), both branches in one batch; optionally skip-layer guidance on top
  (`skip_guidance_layers`). SAI sd3.5 `sd3_infer.py` `get_cond`; Diffusers
  `pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py`.
- FLUX.2 (`Flux2Pipeline`, sampling/flux2.py): context = stacked LLM hidden states, no pooled vector;
  reference images for editing; its latents live in the autoencoder's normalized space.
Deviation from Diffusers: latents are kept in float32 between steps whatever the model's dtype.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from PIL import Image
from torch import Tensor, nn

from mmdit.sd3 import skipped_blocks

from .offload import EVERY_PART, borrowed, check_offload, pin, streamed
from .sampler import Conditioning, Guidance, SkipLayerGuidance, denoise, slg_window
from .schedules import flux_sigmas, given_sigmas, sd3_sigmas
from .taca import TemperatureSpec

@dataclass(frozen=True)
class Defaults:
    """Per-model sampling defaults: steps and guidance (FLUX-dev: distilled; SD3: CFG scale; 0 = none),
    image side in pixels, and the nearest-neighbour factor `mmdit sample` enlarges the PNG by."""

    steps: int
    guidance: float
    size: int = 1024
    upscale: int = 1


# The official recommendations (Diffusers' pipeline docs and the SD3.5 model cards); the variant
# comes from the weights, except Large vs Large Turbo which share a layout (see `variant_of`).
DEFAULTS = {
    "flux-dev": Defaults(28, 3.5),
    "flux-schnell": Defaults(4, 0.0),
    "sd3.5-large": Defaults(28, 3.5),
    "sd3.5-large-turbo": Defaults(4, 0.0),
    "sd3.5-medium": Defaults(40, 4.5),
    "sd3-medium": Defaults(28, 7.0),
}


def variant_of(transformer: nn.Module, name_hint: str = "") -> str:
    """The transformer's variant; SD3.5 Large is Turbo when the repo or file name says so (the only hint there is)."""
    variant = getattr(transformer, "variant", "")
    if variant.startswith("sd3.5-large") and "turbo" in name_hint.lower():
        return "sd3.5-large-turbo"
    return variant


def defaults_for(variant: str) -> Defaults:
    """Defaults of the variant, or of the preset a custom size derives from ("flux-dev-like (custom size)")."""
    base = variant.split("-like")[0].split(" ")[0]
    if base in DEFAULTS:
        return DEFAULTS[base]
    return DEFAULTS["flux-dev"] if base.startswith("flux") else DEFAULTS["sd3.5-large"]


def as_prompts(prompts: str | list[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images (rounded to 8 bits; numpy is not needed)."""
    out = []
    for img in images.detach().float().cpu():
        hwc = (img * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()  # (H, W, 3), its own storage
        out.append(Image.frombytes("RGB", (hwc.shape[1], hwc.shape[0]), bytes(hwc.untyped_storage())))
    return out


class Pipeline:
    """The parts of one model and `generate`; `FluxPipeline` / `SD3Pipeline` add the family's three specifics."""

    family = ""  # "flux" or "sd3", as the transformer's

    def __init__(
        self,
        transformer: nn.Module,
        autoencoder: nn.Module,
        encoders: dict[str, nn.Module | None],
        tokenizers: dict[str, object | None],
        name: str = "",
        offload: str | None = None,
        device: str | torch.device | None = None,
        defaults: Defaults | None = None,
        offload_encoders: bool = False,
    ):
        """offload: where the weights live and when they come to `device` (sampling/offload.py):
            None, "encoders", "stream-encoders", "model" or "stream"; the parts it offloads stay where
            they are given (the CPU), pinned when `device` is CUDA. `offload_encoders=True` is
            `offload="encoders"`.
        device: where the pipeline computes (default: the transformer's).
        """
        self.transformer, self.autoencoder = transformer, autoencoder
        self.encoders, self.tokenizers = encoders, tokenizers
        self.name = name  # where it was loaded from (repo id or path)
        self.variant = variant_of(transformer, name)
        self.defaults = defaults or defaults_for(self.variant)  # the model folder's own, else the family's
        self.offload = check_offload(offload or ("encoders" if offload_encoders else None))
        self._device = None if device is None else torch.device(device)
        if self.offload and self.device.type == "cuda":
            for part in self._offloaded():
                pin(part)

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes: the one given, else the transformer's."""
        return self._device or next(self.transformer.parameters()).device

    def _offloaded(self) -> list[nn.Module]:
        """The parts that live off the device: none, the text encoders, or every part."""
        if self.offload is None:
            return []
        parts = [e for e in self.encoders.values() if e is not None]
        return parts + [self.transformer, self.autoencoder] if self.offload in EVERY_PART else parts

    def _running(self, part: nn.Module):
        """The context in which `part` runs on the pipeline's device under its offload mode."""
        if not any(part is p for p in self._offloaded()):
            return nullcontext(part)
        return (streamed if self.offload.startswith("stream") else borrowed)(part, self.device)

    def _encode(self, role: str, prompts: list[str], **kwargs):
        """Tokenize and run the encoder of `role` on the pipeline's device: (its output, the token ids)."""
        enc, tok = self.encoders[role], self.tokenizers[role]
        ids = tok(prompts).to(self.device)
        with torch.no_grad(), self._running(enc):
            out = enc(ids, **kwargs)
        return out, ids

    # ---- what a family says ----

    def encode_prompt(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        """(context (B, L, D), pooled (B, P)): exactly what the transformer receives."""
        raise NotImplementedError

    def sigmas(self, steps: int, latent_h: int, latent_w: int) -> Tensor:
        """The noise levels for `steps` steps at this latent size: (steps + 1,) on the CPU, from 1 to 0."""
        raise NotImplementedError

    def guidance_for(self, prompts: list[str], guidance: float, negative_prompt: str | list[str] | None,
                     true_cfg: float) -> Guidance:
        """What `generate`'s guidance arguments mean for this family."""
        raise NotImplementedError

    def user_sigmas(self, sigmas: list[float] | Tensor, steps: int, latent_h: int, latent_w: int) -> Tensor:
        """`generate(sigmas=...)`: the user's noise levels as the sampler visits them (here: as given)."""
        return given_sigmas(sigmas)

    def references(self, images: list[Image.Image]) -> list[Tensor]:
        """Reference images for editing, as latents the transformer attends to: FLUX.2 only (sampling/flux2.py)."""
        raise ValueError(f"reference images (images=, --image) are for FLUX.2 models; this is a {self.family} model")

    def autoencoder_latents(self, latents: Tensor) -> Tensor:
        """The sampled latents as the autoencoder decodes them (here: as they are; FLUX.2 de-normalizes)."""
        return latents

    @property
    def guidance_applies(self) -> bool:
        """Whether `generate`'s guidance scale acts on this model (not on a step-distilled FLUX.2 [klein])."""
        return True

    # ---- the same for every family ----

    @torch.no_grad()
    def generate(
        self,
        prompts: str | list[str],
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompt: str | list[str] | None = None,
        seed: int | None = None,
        noise: Tensor | None = None,
        temperature: TemperatureSpec = None,
        sigmas: list[float] | Tensor | None = None,
        true_cfg: float = 1.0,
        gate_lora: bool = True,
        decode_tile: int | None = None,
        output: str = "pil",
        progress: bool = False,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_start: float = 0.01,
        skip_layer_guidance_stop: float = 0.2,
        images: list[Image.Image] | None = None,
    ):
        """Images for the prompts (height and width: default the model's, 1024 for the real ones).

        steps, guidance: default the model's (`self.defaults`); guidance is FLUX-dev's distilled scale
            or SD3's CFG scale (`guidance_for`).
        noise: the initial latents (B, z, H/f, W/f) (z, f: the autoencoder's, 16 and 8 for the real
            ones); else drawn from `seed` with a CPU generator.
        temperature: TACA's: a number, a [2, 2] matrix, or a function of t (sampling/taca.py).
        gate_lora: with a temperature given, LoRA adapters are on only where it is not 1.
        sigmas: your own noise levels instead of the model's schedule (`user_sigmas`; FLUX.2 shifts them, as Diffusers).
        true_cfg: FLUX: classifier-free guidance at this scale when > 1 and a negative prompt is given.
        decode_tile: tiled decoding (latent pixels per tile) for large images.
        output: "pil" (list of images), "tensor" ((B, 3, H, W) in [0, 1]) or "latent".
        skip_guidance_layers (SD3 only, with CFG): skip-layer guidance, as Diffusers' argument of the
            same name (SD3.5 Medium: [7, 8, 9]): the CFG velocity gets `skip_layer_guidance_scale *
            (v_pos - v_skip)`, v_skip the positive branch without these joint blocks, in the steps i of
            N with `N * skip_layer_guidance_start < i < N * skip_layer_guidance_stop`.
        images (FLUX.2 only): reference images for editing (`references`, sampling/flux2.py); the output
            takes the first one's size where height or width is not given.
        """
        prompts = as_prompts(prompts)
        refs = self.references(images) if images else []  # (1, z, h_i, w_i) latents each
        if refs:
            f = self.autoencoder.params.downscale
            height = refs[0].shape[-2] * f if height is None else height
            width = refs[0].shape[-1] * f if width is None else width
        height = self.defaults.size if height is None else height
        width = self.defaults.size if width is None else width
        if output not in ("pil", "tensor", "latent"):
            raise ValueError(f"output must be 'pil', 'tensor' or 'latent', got {output!r}")
        if height <= 0 or width <= 0 or height % 16 or width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {height}x{width}")
        if skip_guidance_layers is not None and self.family != "sd3":
            raise ValueError(f"skip-layer guidance (skip_guidance_layers, --slg) is SD3-only; this is a {self.family} model")
        steps = self.defaults.steps if steps is None else steps
        guidance = self.defaults.guidance if guidance is None else guidance
        ae = self.autoencoder
        h, w = height // ae.params.downscale, width // ae.params.downscale
        shape = (len(prompts), ae.params.z_channels, h, w)
        if noise is None:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            noise = torch.randn(shape, generator=gen)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {list(shape)} (B, z, H/f, W/f), got {list(noise.shape)}")
        sigmas = self.sigmas(steps, h, w) if sigmas is None else self.user_sigmas(sigmas, steps, h, w)  # (N + 1,), CPU
        slg = None
        if skip_guidance_layers is not None:
            slg = SkipLayerGuidance(skipped_blocks(skip_guidance_layers, self.transformer.params.depth),
                                    skip_layer_guidance_scale,
                                    slg_window(sigmas, skip_layer_guidance_start, skip_layer_guidance_stop))

        cond = Conditioning(*self.encode_prompt(prompts), model_kwargs={"ref_latents": refs} if refs else {})
        guide = replace(self.guidance_for(prompts, guidance, negative_prompt, true_cfg), slg=slg)
        with self._running(self.transformer):
            latents = denoise(self.transformer, noise.to(self.device, torch.float32), sigmas, cond, guide,
                              temperature, gate_lora, progress)
        latents = self.autoencoder_latents(latents)
        if output == "latent":
            return latents
        with self._running(ae):
            images = (ae.decode(latents.to(ae.dtype), tile=decode_tile).float() / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W)
        return images if output == "tensor" else to_pil(images)


class FluxPipeline(Pipeline):
    family = "flux"

    def encode_prompt(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        prompts = as_prompts(prompts)
        context, _ = self._encode("t5", prompts)  # (B, L, 4096)
        if self.encoders.get("clip_l") is None:  # a model without CLIP (assets/tiny-flux): text enters by attention only
            return context, context.new_zeros(len(prompts), self.transformer.params.vec_in_dim)
        (hidden, _), ids = self._encode("clip_l", prompts)  # (B, 77, 768)
        pooled = hidden[torch.arange(len(prompts)), ids.argmax(-1)]  # EOS state, unprojected
        return context, pooled

    def sigmas(self, steps: int, latent_h: int, latent_w: int) -> Tensor:
        # dev-type models are shifted by the image size, schnell-type not (BFL's `shift=(name != "flux-schnell")`)
        return flux_sigmas(steps, (latent_h // 2) * (latent_w // 2), shifted=self.transformer.params.guidance_embed)

    def guidance_for(self, prompts, guidance, negative_prompt, true_cfg) -> Guidance:
        distilled = guidance if self.transformer.params.guidance_embed else None  # dev-type: an input; schnell: none
        if negative_prompt is None or true_cfg <= 1:
            return Guidance(distilled=distilled)
        negative = Conditioning(*self.encode_prompt(negatives(negative_prompt, len(prompts))))
        return Guidance(distilled=distilled, negative=negative, cfg=true_cfg)


class SD3Pipeline(Pipeline):
    family = "sd3"

    def __init__(self, *args, max_sequence_length: int = 256, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_sequence_length = max_sequence_length  # T5 tokens; also the zero block's length without T5

    def encode_prompt(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        prompts = as_prompts(prompts)
        (l_hidden, l_pooled), _ = self._encode("clip_l", prompts, skip=1)  # (B, 77, 768), penultimate layer
        (g_hidden, g_pooled), _ = self._encode("clip_g", prompts, skip=1)  # (B, 77, 1280)
        width = self.transformer.params.context_in_dim
        if self.encoders.get("t5") is not None:
            t5, _ = self._encode("t5", prompts)  # (B, L, 4096)
        else:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, width, device=self.device, dtype=l_hidden.dtype)
        lg = torch.cat((l_hidden, g_hidden.to(l_hidden.dtype)), -1)  # (B, 77, 2048)
        lg = nn.functional.pad(lg, (0, width - lg.shape[-1]))  # (B, 77, 4096)
        context = torch.cat((lg, t5.to(lg.dtype)), 1)  # (B, 77 + L, 4096)
        return context, torch.cat((l_pooled, g_pooled.to(l_pooled.dtype)), -1)  # (B, 2048)

    def sigmas(self, steps: int, latent_h: int, latent_w: int) -> Tensor:
        return sd3_sigmas(steps)

    def guidance_for(self, prompts, guidance, negative_prompt, true_cfg) -> Guidance:
        if guidance <= 1:  # no CFG (SD3.5 Large Turbo)
            return Guidance()
        negative = Conditioning(*self.encode_prompt(negatives(negative_prompt or "", len(prompts))))
        return Guidance(negative=negative, cfg=guidance)


def negatives(negative_prompt: str | list[str], n: int) -> list[str]:
    """The negative prompt for each of n prompts (one string is used for all)."""
    negs = [negative_prompt] * n if isinstance(negative_prompt, str) else as_prompts(negative_prompt)
    if len(negs) != n:
        raise ValueError(f"{len(negs)} negative prompts for {n} prompts")
    return negs

