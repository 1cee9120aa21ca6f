"""`load_pipeline`: find the parts of a model from one source and load each with its loader in convert/.

A source is
- a Diffusers-style folder (model_index.json; transformer/, vae/, text_encoder*/, tokenizer*/);
- an official single file: FLUX `flux1-dev.safetensors` (BFL) with `ae.safetensors` beside it, FLUX.2
  `flux2-dev.safetensors` / `flux-2-klein-4b.safetensors` (BFL) with `ae.safetensors` or `vae/` and the
  `text_encoder/`, `tokenizer/` folders beside it, or an
  SAI `sd3.5_*.safetensors` whose encoders and autoencoder are bundled (`text_encoders.*`,
  `first_stage_model.*`) or lie beside it (`text_encoders/clip_l.safetensors`, ...);
- a hub repo id (`owner/name`, or `owner/name/file.safetensors` for a single file in it),
  downloaded with only the files needed (sampling/hub.py).
Any part can be given by keyword instead (`vae=`, `clip_l=`, `clip_g=`, `t5=`, `llm=` (FLUX.2's text
encoder folder), and each encoder's `..._tokenizer=`); what is not given is looked for where the official
layouts put it (sampling/parts.py). The family comes from the transformer's weights, never from a name;
the name only tells SD3.5 Large Turbo from Large, and a FLUX.2 [klein] single file's base model from the
distilled one (sampling/flux2.py `is_distilled`).

A Diffusers folder's `model_index.json` may mark a part as absent on purpose (`"text_encoder": [null,
null]`, Diffusers' convention for optional components): that text encoder's features are then zeros
(a FLUX model without CLIP gets a zero pooled vector), and the autoencoder's folder may hold a
weightless `PixelCodec` (mmdit/pixel_codec.py) instead. Its `"sampling_defaults"` entry, when there
is one, replaces the family's defaults (`steps`, `guidance`, `size`, `upscale`, `trained_sizes`: other
sizes are drawn with a warning, and FLUX.1's `true_cfg` and `negative`: true CFG by default;
sampling/pipeline.py `Defaults`), a bad value a CheckpointError naming the file and the setting.
A FLUX T5 tokenizer folder's `model_max_length` sets the text length (else 512).
The tiny model shipped in assets/tiny-flux is such a folder.

Before any weight is read, the transformer is identified from its file's header (`detect_transformer`)
and refused if this text-to-image pipeline cannot run it: a variant whose transformer takes more input
channels than its latents have (FLUX.1 Fill, Depth, Canny) needs inputs beside the noise that
`generate` does not give (`check_runnable`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from convert import Detected, detect_transformer, load_autoencoder, load_text_encoder, load_tokenizer, load_transformer
from convert.autoencoder_flux2 import load_autoencoder_flux2
from convert.files import CheckpointError, read_config
from convert.llm import load_chat_tokenizer, load_llm_encoder
from mmdit.chat_tokenizer import MAX_LENGTH
from mmdit.pixel_codec import is_pixel_codec, load_pixel_codec
from mmdit.tokenizer import CLIPTokenizer

from .flux2 import Flux2Pipeline, is_distilled, prompt_format
from .hub import resolve
from .limits import check_size
from .offload import EVERY_PART, check_offload
from .parts import DIFFUSERS_DIRS, ROLES, Part, absent_on_purpose, find_parts, model_index
from .pipeline import Defaults, FluxPipeline, Pipeline, SD3Pipeline

log = logging.getLogger(__name__)

# The tiny FLUX-architecture model trained on colored-shape scenes, shipped with the repo
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-flux"
OPTIONAL = {("sd3", "t5")}  # SD3 without T5: zeros in its place, as Diffusers does
T5_LENGTH = {"flux": 512, "sd3": 256}  # Diffusers' max_sequence_length defaults (BFL: schnell 256)
# Variants whose transformer takes inputs beside the noisy latents, concatenated along the channels
# (BFL flux `src/flux/sampling.py` `prepare_fill`, `prepare_control`; Diffusers `FluxFillPipeline`,
# `FluxControlPipeline`), and what those inputs are
EXTRA_INPUTS = {
    "flux-fill": "an inpainting mask and the masked image's latents (FLUX.1 Fill: Diffusers FluxFillPipeline)",
    "flux-depth/canny": "a control image's latents, a depth map or Canny edges (FLUX.1 Depth/Canny: Diffusers "
                        "FluxControlPipeline)",
}
PIPELINES = {cls.family: cls for cls in (FluxPipeline, Flux2Pipeline, SD3Pipeline)}  # by the transformer's family


def default_model() -> str:
    """The model used when none is named: the tiny one shipped in assets/tiny-flux (offline)."""
    if not (DEFAULT_MODEL / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the default model is not at {DEFAULT_MODEL}: pass --model SOURCE (a Diffusers folder, an official "
            "single file such as flux1-dev.safetensors, or a hub repo id such as black-forest-labs/FLUX.1-dev)"
        )
    return str(DEFAULT_MODEL)


def _missing(name: str, source: Path) -> CheckpointError:
    what = {
        "vae": "the autoencoder: pass vae=PATH (ae.safetensors, a Diffusers vae/ folder, or a file with first_stage_model.* keys)",
        "clip_l": "the CLIP-L text encoder: pass clip_l=PATH (clip_l.safetensors or a text_encoder/ folder)",
        "clip_g": "the CLIP-G text encoder: pass clip_g=PATH (clip_g.safetensors or a text_encoder_2/ folder)",
        "t5": "the T5 text encoder: pass t5=PATH (t5xxl_fp16.safetensors or a text_encoder folder)",
        "llm": "the LLM text encoder: pass llm=FOLDER (a text_encoder/ folder: Qwen3 [klein], Mistral-Small [dev])",
    }
    base = name.removesuffix("_tokenizer")
    if name.endswith("_tokenizer"):
        kinds = {"t5": "spiece.model or tokenizer.json", "llm": "tokenizer.json and a chat template"}
        kind = kinds.get(base, "vocab.json and merges.txt")
        return CheckpointError(f"{source}: no {base} tokenizer found: pass {name}=FOLDER (holding {kind})")
    return CheckpointError(f"{source}: did not find {what[base]}")


def check_runnable(found: Detected) -> None:
    """Refuse a transformer whose input is wider than its output: the extra input channels are inputs
    (a mask, a control image) that this text-to-image pipeline does not give, and the first step
    would fail after everything is loaded."""
    p = found.params
    width_in, width_out = getattr(p, "in_channels", None), getattr(p, "out_channels", None)
    if width_in is None or width_out is None or width_in == width_out:
        return
    needs = EXTRA_INPUTS.get(found.variant, "inputs beside the noisy latents")
    raise CheckpointError(
        f"{found.source}: a {found.variant} transformer: it takes {width_in} input channels, {width_out} of them "
        f"the latents, the other {width_in - width_out} {needs}. This pipeline generates from text alone: "
        "use a text-to-image model (FLUX.1-dev or -schnell, SD3/SD3.5)"
    )


def _folder_length(folder: Path) -> int | None:
    """A tokenizer folder's own `model_max_length`, if it sets a sane one."""
    n = (read_config(folder / "tokenizer_config.json") or {}).get("model_max_length") if folder.is_dir() else None
    return n if isinstance(n, int) and n <= 100_000 else None


def _tokenizer(part: Part, role: str, family: str, max_length: int | None):
    if role == "t5":
        own = _folder_length(part.path) if family == "flux" else None
        return load_tokenizer(part.path, max_length=max_length or own or T5_LENGTH[family])
    if part.pad is not None:
        return CLIPTokenizer.from_files(part.path / "vocab.json", part.path / "merges.txt", pad=part.pad)
    return load_tokenizer(part.path)


def folder_defaults(entry, family: str, index: Path) -> Defaults:
    """A model_index.json's "sampling_defaults" entry as `Defaults`; CheckpointError naming the file and the
    setting for a bad one, and for FLUX.1's true CFG (`true_cfg`, `negative`) in another family's folder
    (SD3's and FLUX.2's CFG scale is `guidance`)."""
    try:
        if not isinstance(entry, dict):
            raise TypeError(f"expected an object of settings, got {entry!r}")
        defaults = Defaults(**entry)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{index}: sampling_defaults: {e}") from None
    if family != "flux" and (defaults.true_cfg != 1 or defaults.negative):
        raise CheckpointError(f"{index}: sampling_defaults: true_cfg and negative are FLUX.1's true CFG; this is a "
                              f"{family} model, whose CFG scale is guidance")
    return defaults


def load_pipeline(
    source: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    offload: str | None = None,
    offload_encoders: bool = False,
    max_sequence_length: int | None = None,
    revision: str | None = None,
    image_size: tuple[int, int] | None = None,
    **given: str | os.PathLike | None,
) -> Pipeline:
    """Load a FLUX, FLUX.2 or SD3 pipeline from a folder, a single file or a hub repo id (see the module docstring).

    dtype: every part's (default: each file's own; float8 is upcast to bfloat16).
    offload: which parts stay on the CPU and come to `device` only while they run: None, "encoders",
        "stream-encoders", "model" or "stream" (sampling/offload.py). `offload_encoders=True` is
        `offload="encoders"`.
    max_sequence_length: T5 tokens (default FLUX 512, SD3 256, as Diffusers); FLUX.2: LLM tokens (512).
    image_size: (height, width) in pixels that `generate` will be asked for: checked against the model
        (`sampling.limits.check_size`: SD3's position table) before the transformer and the text encoders
        are loaded (the autoencoder, which sets the pixels per latent, is loaded first).
    Raises CheckpointError before loading anything for a transformer this pipeline cannot run
    (`check_runnable`: FLUX.1 Fill, Depth, Canny).
    """
    allowed = {"vae", *(r + s for roles in ROLES.values() for r in roles for s in ("", "_tokenizer"))}
    unknown = set(given) - allowed
    if unknown:
        raise TypeError(f"load_pipeline: unknown part(s) {sorted(unknown)}; parts are {sorted(allowed)}")
    path, name = resolve(str(source), revision)
    offload = check_offload(offload or ("encoders" if offload_encoders else None))
    everything = offload in EVERY_PART
    found = detect_transformer(path)  # the header only
    check_runnable(found)
    family = found.family
    parts = find_parts(path, family, given)
    absent = absent_on_purpose(path)
    dropped = {role for role, dirs in DIFFUSERS_DIRS[family].items() if set(dirs) <= absent}  # no encoder on purpose
    for k, p in parts.items():
        role = k.removesuffix("_tokenizer")
        if p is None and (family, role) not in OPTIONAL and role not in dropped:
            raise _missing(k, path)
    vae, ae_device = parts["vae"].path, "cpu" if everything else device
    if is_pixel_codec(vae):
        ae = load_pixel_codec(vae, device=ae_device, dtype=dtype)
    elif family == "flux2":
        ae = load_autoencoder_flux2(vae, device=ae_device, dtype=dtype)
    else:
        ae = load_autoencoder(vae, family=family, device=ae_device, dtype=dtype)
    if image_size is not None:
        check_size(*image_size, found.params, ae.params.downscale)
    transformer = load_transformer(path, device="cpu" if everything else device, dtype=dtype)
    enc_device = "cpu" if offload else device
    encoders, tokenizers = {}, {}
    for role in ROLES[family]:
        enc, tok = parts[role], parts[f"{role}_tokenizer"]
        if enc is None or tok is None:
            if role not in dropped:
                log.warning("%s: no %s text encoder%s; its features are zeros", path, role, "" if enc is None else " tokenizer")
            encoders[role] = tokenizers[role] = None
            continue
        if role == "llm":  # FLUX.2: one LLM (only the layers used) and its chat tokenizer (convert/llm.py)
            encoders[role] = load_llm_encoder(enc.path, device=enc_device, dtype=dtype)
            tokenizers[role] = load_chat_tokenizer(tok.path, prompt_format(encoders[role]),
                                                   max_length=max_sequence_length or MAX_LENGTH)
            continue
        encoders[role] = load_text_encoder(enc.path, device=enc_device, dtype=dtype, prefix=enc.prefix)
        tokenizers[role] = _tokenizer(tok, role, family, max_sequence_length)
    kwargs = {"max_sequence_length": max_sequence_length or T5_LENGTH["sd3"]} if family == "sd3" else {}
    if family == "flux2":
        kwargs["distilled"] = is_distilled(path)
    own_defaults = model_index(path).get("sampling_defaults")
    if own_defaults is not None:
        kwargs["defaults"] = folder_defaults(own_defaults, family, path / "model_index.json")
    return PIPELINES[family](transformer, ae, encoders, tokenizers, name=name, offload=offload, device=device, **kwargs)
