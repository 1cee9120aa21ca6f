"""Text to image with FLUX.1 and SD3/SD3.5: encode the prompts, denoise (sampling/sampler.py), decode.

`Pipeline` holds the parts (transformer, autoencoder, text encoders and tokenizers by role:
`clip_l`, `clip_g`, `t5`) and runs `generate`. A family is a small subclass saying three things:
what the transformer receives about a prompt (`encode_prompt`), which noise levels it visits
(`sigmas`, sampling/schedules.py) and how it is guided (`guidance_for`, a `Guidance`):
- FLUX (`FluxPipeline`): context = T5 states; pooled = CLIP-L's pooled state, unprojected (zeros for
  a model without CLIP, such as the tiny one in assets/tiny-flux); dev-type models take the distilled
  guidance scale as an input, schnell-type none; true CFG with a negative prompt is optional
  (`true_cfg`), on by default where the model folder says so (`Defaults.true_cfg`, `negative`: a model
  trained with caption dropout). BFL flux `src/flux/sampling.py` `prepare`; Diffusers `pipelines/flux/pipeline_flux.py`.
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
`generate` checks its arguments before any work (sizes against the model and the memory:
sampling/limits.py), warns of guidance arguments that would do nothing on the model (`inert`), and
raises NonFiniteError where NaN or Inf appear (encoding, sampling, decoding) instead of returning them.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from PIL import Image
from torch import Tensor, nn

from mmdit.sd3 import skipped_blocks

from .limits import check_finite, check_memory, check_seed, check_size, largest_activation
from .offload import EVERY_PART, borrowed, check_offload, pin, streamed
from .sampler import Conditioning, Guidance, NonFiniteError, SkipLayerGuidance, all_finite, denoise, slg_window
from .schedules import SD3_SHIFT, flux_mu, flux_sigmas, given_sigmas, sd3_sigmas
from .taca import TemperatureSpec

@dataclass(frozen=True)
class Defaults:
    """Per-model sampling defaults: steps and guidance (FLUX-dev: distilled; SD3: CFG scale; 0 = none),
    image side in pixels, the nearest-neighbour factor `mmdit sample` enlarges the PNG by, the sizes
    (width, height) the model was trained at when it draws well at those only (the tiny model: 32x32),
    and FLUX.1's true CFG: its scale (1 = off) and the negative prompt it is used with.

    `generate` draws any other size too, with a warning naming these (not an error: a fine-tune at another
    resolution keeps its base's folder settings, and the attention probe at other sizes is an experiment
    of its own). A model_index.json writes them "WIDTHxHEIGHT"; empty (the real models): no warning.

    true_cfg > 1 suits a model trained with caption dropout (some captions empty, so that it also learned
    the unconditional velocity): `generate` then guides against `negative` ("": the empty caption) unless
    told otherwise (`Pipeline.true_cfg_for`). Raises ValueError for a true_cfg that is not a finite number
    >= 1, a negative that is not a string, or a negative without true CFG (it would be used nowhere).
    """

    steps: int
    guidance: float
    size: int = 1024
    upscale: int = 1
    trained_sizes: tuple[tuple[int, int], ...] = ()
    true_cfg: float = 1.0
    negative: str = ""

    def __post_init__(self):
        object.__setattr__(self, "trained_sizes", tuple(map(parse_trained_size, self.trained_sizes)))
        cfg = self.true_cfg
        if type(cfg) not in (int, float) or not math.isfinite(cfg) or cfg < 1:
            raise ValueError(f"true_cfg is {cfg!r}, expected a finite number >= 1 (1: no true CFG)")
        object.__setattr__(self, "true_cfg", float(cfg))
        if not isinstance(self.negative, str):
            raise ValueError(f"negative is {self.negative!r}, expected a string (the negative prompt; \"\": the "
                             "empty one)")
        if self.negative and self.true_cfg == 1:
            raise ValueError(f"negative is {self.negative!r} but true_cfg is 1: the negative prompt is used only with "
                             "true CFG (a true_cfg above 1)")


def parse_trained_size(size) -> tuple[int, int]:
    """"WIDTHxHEIGHT" (as model_index.json writes it) or (width, height) -> (width, height), positive integers."""
    try:
        w, h = (int(x) for x in size.lower().split("x")) if isinstance(size, str) else size
    except (TypeError, ValueError):
        w = h = 0
    if type(w) is int and type(h) is int and w > 0 and h > 0:
        return w, h
    raise ValueError(f"trained_sizes holds {size!r}, expected sizes written WIDTHxHEIGHT, e.g. \"32x32\"")


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

    def _check_memory(self, height: int, width: int, batch: int, tiled: bool) -> None:
        """Refuse a size whose largest activation alone exceeds the device's free memory (sampling/limits.py)."""
        itemsize = next(self.transformer.parameters()).element_size()
        need = largest_activation(height, width, batch, self.transformer.params, self.autoencoder.params, itemsize,
                                  self.autoencoder.dtype.itemsize, tiled)
        check_memory(need, self.device, height, width)

    # ---- what a family says ----

    def encode_prompt(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        """(context (B, L, D), pooled (B, P)): exactly what the transformer receives."""
        raise NotImplementedError

    def sigmas(self, steps: int, latent_h: int, latent_w: int) -> Tensor:
        """The noise levels for `steps` steps at this latent size: (steps + 1,) on the CPU, from 1 to 0."""
        raise NotImplementedError

    def shift(self, latent_h: int, latent_w: int, steps: int) -> float:
        """The factor s of the schedule's shift `s t / (1 + (s - 1) t)` at this latent size and step count
        (1: none), the one `generate(sigmas=...)` applies to the given levels, as Diffusers' scheduler does."""
        raise NotImplementedError

    def inert(self, guidance: float | None, negative_prompt, true_cfg: float) -> dict[str, str]:
        """The guidance arguments given that would do nothing on this model: {argument: why}. `generate`
        warns of them; `mmdit sample` neither applies nor records them. true_cfg and negative_prompt as
        `true_cfg_for` resolves them."""
        return {}

    def true_cfg_for(self, true_cfg: float | None, negative_prompt: str | list[str] | None
                     ) -> tuple[float, str | list[str] | None]:
        """(true CFG scale, negative prompt) as `generate` applies them: the scale given, else the model's
        (`defaults.true_cfg`, 1 = off); the negative prompt given, else the model's (`defaults.negative`)
        where the model's own true CFG is on (`defaults.true_cfg` > 1) and the scale is above 1. So an
        explicit `true_cfg=1.0` turns it off, and a negative prompt given is used at the model's scale.
        Only FLUX.1 has true CFG; the other families' defaults keep true_cfg 1 (sampling/loading.py)."""
        true_cfg = self.defaults.true_cfg if true_cfg is None else true_cfg
        if negative_prompt is None and true_cfg > 1 and self.defaults.true_cfg > 1:
            negative_prompt = self.defaults.negative
        return true_cfg, negative_prompt

    def guidance_for(self, prompts: list[str], guidance: float, negative_prompt: str | list[str] | None,
                     true_cfg: float) -> Guidance:
        """What `generate`'s guidance arguments mean for this family."""
        raise NotImplementedError

    def references(self, images: list[Image.Image]) -> list[Tensor]:
        """Reference images for editing, as latents the transformer attends to: FLUX.2 only (sampling/flux2.py)."""
        raise ValueError(f"reference images (images=, --image) are for FLUX.2 models; this is a {self.family} model")

    def autoencoder_latents(self, latents: Tensor) -> Tensor:
        """The sampled latents as the autoencoder decodes them (here: as they are; FLUX.2 de-normalizes)."""
        return latents

    def sampler_latents(self, latents: Tensor) -> Tensor:
        """The inverse: the autoencoder's `encode` output as the sampler and the transformer see it, the space
        noise is drawn in and training learns in (here: as it is; FLUX.2 normalizes)."""
        return latents

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
        seed: int | list[int] | None = None,
        noise: Tensor | None = None,
        temperature: TemperatureSpec = None,
        sigmas: list[float] | Tensor | None = None,
        true_cfg: float | None = None,
        gate_lora: bool = True,
        decode_tile: int | None = None,
        output: str = "pil",
        progress: bool = False,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_start: float = 0.01,
        skip_layer_guidance_stop: float = 0.2,
        noise_levels: list[float] | Tensor | None = None,
        images: list[Image.Image] | None = None,
    ):
        """Images for the prompts (height and width: default the model's, 1024 for the real ones).

        steps, guidance: default the model's (`self.defaults`); guidance is FLUX-dev's distilled scale
            or SD3's CFG scale (`guidance_for`).
        noise: the initial latents (B, z, H/f, W/f) (z, f: the autoencoder's, 16 and 8 for the real
            ones); else drawn from `seed` (0 to 2**64 - 1) with a CPU generator. A list of seeds, one per
            prompt: each image's noise is drawn alone from its own seed, as `generate([prompt], seed=s)`
            draws it, so an image does not depend on the other prompts of the batch (`mmdit sample --prompts`).
        temperature: TACA's: a number, a [2, 2] matrix, or a function of t (sampling/taca.py).
        gate_lora: with a temperature given, LoRA adapters are on only where it is not 1.
        sigmas: your own noise levels instead of the model's schedule, in Diffusers' meaning
            (`pipe(sigmas=...)`, `FlowMatchEulerDiscreteScheduler.set_timesteps`): decreasing, in (0, 1],
            shifted by the model's schedule shift before use (`self.shift`: FLUX-dev exp(mu) of the image
            size, SD3 3.0, FLUX-schnell none, FLUX.2 exp(mu) of the image size and `steps`), then 0
            appended; the run has one step per level. SD3: [1.0, 0.75, 0.5, 0.25] -> [1.0, 0.9, 0.75, 0.5, 0.0].
        noise_levels: your own noise levels t used exactly as given (no shift): decreasing, in (0, 1],
            then 0 appended. Give `sigmas` or `noise_levels`, not both.
        true_cfg: FLUX: classifier-free guidance at this scale when > 1 and a negative prompt is given
            (default: the model's, `defaults.true_cfg`, 1 = off; where the model's is on, its own negative
            prompt `defaults.negative` is used when none is given: `true_cfg_for`).
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
        ae = self.autoencoder
        check_size(height, width, self.transformer.params, ae.params.downscale)
        trained = self.defaults.trained_sizes
        if trained and (width, height) not in trained:
            warnings.warn(f"{self.name or 'this model'} was trained at {', '.join(f'{w}x{h}' for w, h in trained)} only "
                          f"(WIDTHxHEIGHT; sampling_defaults.trained_sizes in its model_index.json): at {width}x{height} "
                          "it draws poorly, often an almost blank canvas", stacklevel=3)
        if skip_guidance_layers is not None and self.family != "sd3":
            raise ValueError(f"skip-layer guidance (skip_guidance_layers, --slg) is SD3-only; this is a {self.family} model")
        check_finite(guidance=guidance, true_cfg=true_cfg, skip_layer_guidance_scale=skip_layer_guidance_scale,
                     skip_layer_guidance_start=skip_layer_guidance_start, skip_layer_guidance_stop=skip_layer_guidance_stop)
        seeds = seed if isinstance(seed, (list, tuple)) else None
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed, or one per prompt")
        for s in seeds or [seed]:
            check_seed(s)
        if sigmas is not None and noise_levels is not None:
            raise ValueError("give sigmas (shifted by the model's schedule, as Diffusers) or noise_levels (as they are), "
                             "not both")
        true_cfg, negative_prompt = self.true_cfg_for(true_cfg, negative_prompt)
        for name, why in self.inert(guidance, negative_prompt, true_cfg).items():
            warnings.warn(f"{name} does nothing here: {why}", stacklevel=3)
        steps = self.defaults.steps if steps is None else steps
        guidance = self.defaults.guidance if guidance is None else guidance
        h, w = height // ae.params.downscale, width // ae.params.downscale
        shape = (len(prompts), ae.params.z_channels, h, w)
        if noise is None and seeds is not None:  # (1, z, h, w) each, drawn alone
            noise = torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(s)) for s in seeds])
        elif noise is None:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            noise = torch.randn(shape, generator=gen)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {list(shape)} (B, z, H/f, W/f), got {list(noise.shape)}")
        if sigmas is not None:  # (N + 1,) on the CPU
            levels = given_sigmas(sigmas, self.shift(h, w, steps))
        else:
            levels = given_sigmas(noise_levels) if noise_levels is not None else self.sigmas(steps, h, w)
        slg = None
        if skip_guidance_layers is not None:
            slg = SkipLayerGuidance(skipped_blocks(skip_guidance_layers, self.transformer.params.depth),
                                    skip_layer_guidance_scale,
                                    slg_window(levels, skip_layer_guidance_start, skip_layer_guidance_stop))
            if not slg.at:
                warnings.warn(f"skip_guidance_layers does nothing here: no step of {len(levels) - 1} is in its window",
                              stacklevel=3)
        self._check_memory(height, width, len(prompts), tiled=decode_tile is not None)

        cond = Conditioning(*self.encode_prompt(prompts), model_kwargs={"ref_latents": refs} if refs else {})
        guide = replace(self.guidance_for(prompts, guidance, negative_prompt, true_cfg), slg=slg)
        for what, c in (("prompts", cond), ("negative prompts", guide.negative)):
            if c is not None and not all_finite(c.context, c.pooled):
                raise NonFiniteError(f"the encoding of the {what} holds NaN or Inf: check the text encoders' weights "
                                     "(and any LoRA on them)")
        with self._running(self.transformer):
            latents = denoise(self.transformer, noise.to(self.device, torch.float32), levels, cond, guide,
                              temperature, gate_lora, progress)
        latents = self.autoencoder_latents(latents)
        if output == "latent":
            return latents
        with self._running(ae):
            images = ae.decode(latents.to(ae.dtype), tile=decode_tile).float()  # (B, 3, H, W) in [-1, 1]
        if not all_finite(images):
            raise NonFiniteError("the autoencoder decoded finite latents to NaN or Inf: check its weights")
        images = (images / 2 + 0.5).clamp(0, 1)
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

    def shift(self, latent_h: int, latent_w: int, steps: int) -> float:
        # Diffusers: the dev repos' scheduler shifts by exp(mu) (`use_dynamic_shifting`), schnell's by 1
        if not self.transformer.params.guidance_embed:
            return 1.0
        return math.exp(flux_mu((latent_h // 2) * (latent_w // 2)))

    def inert(self, guidance, negative_prompt, true_cfg) -> dict[str, str]:
        out = {}
        if guidance is not None and not self.transformer.params.guidance_embed:
            out["guidance"] = ("this FLUX model takes no distilled guidance, and its classifier-free guidance "
                               "scale is true CFG's")
        if negative_prompt is not None and true_cfg <= 1:
            out["negative_prompt"] = "FLUX uses a negative prompt only with true CFG (a true CFG scale above 1)"
        if true_cfg > 1 and negative_prompt is None:
            out["true_cfg"] = "true CFG needs a negative prompt"
        return out

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

    def shift(self, latent_h: int, latent_w: int, steps: int) -> float:
        return SD3_SHIFT

    def inert(self, guidance, negative_prompt, true_cfg) -> dict[str, str]:
        out = {}
        if true_cfg != 1:
            out["true_cfg"] = "SD3's classifier-free guidance scale is the guidance scale"
        cfg = self.defaults.guidance if guidance is None else guidance
        if negative_prompt is not None and cfg <= 1:
            out["negative_prompt"] = f"SD3 uses a negative prompt only with CFG (a guidance scale above 1, here {cfg})"
        return out

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

