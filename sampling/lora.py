"""LoRA files on a whole pipeline: the transformer part and each text encoder's part (convert/lora.py).

FLUX.2's LLM text encoder takes no LoRA (Diffusers' FLUX.2 pipelines load the transformer's part only):
weights for it (`text_encoder.` keys) are refused by name, or skipped with a warning with strict=False.

A control LoRA (BFL's FLUX.1 Depth/Canny LoRAs) widens the transformer's input embedding to take a
control image's latents beside the noise (Diffusers `FluxControlPipeline` loads it by widening
`x_embedder`): this text-to-image pipeline does not give that image, so such a file is refused, named.
"""

from __future__ import annotations

import math
import os
import warnings

from torch import nn

from convert.files import Checkpoint, CheckpointError
from convert.lora import load_lora, load_text_encoder_lora, lora_parts
from convert.lora_formats import ENCODER_ROLES
from mmdit.lora import remove_lora

from .pipeline import Pipeline

# the down-projection of a LoRA on FLUX's input embedding, in BFL, Diffusers/PEFT and kohya spellings
INPUT_EMBEDDING_LORA = ("img_in.lora_A.weight", "x_embedder.lora_A.weight", "img_in.lora_down.weight")


def check_input_width(pipe: Pipeline, path: str | os.PathLike) -> None:
    """Refuse a LoRA whose input-embedding down-projection is wider than the transformer's input: a
    control LoRA, which needs a control image this pipeline does not give."""
    if pipe.family != "flux":
        return
    ckpt, width = Checkpoint.open(path), pipe.transformer.params.in_channels
    for key in ckpt:
        if key.endswith(INPUT_EMBEDDING_LORA) and ckpt.shape(key)[-1] > width:
            raise CheckpointError(
                f"{path}: a control LoRA (FLUX.1 Depth/Canny style): {key!r} takes {ckpt.shape(key)[-1]} input "
                f"channels, the transformer's latents {width}; the rest are a control image's latents (a depth map "
                "or Canny edges), which this text-to-image pipeline does not give"
            )


def load_pipeline_lora(
    pipe: Pipeline, path: str | os.PathLike, scale: float = 1.0, name: str | None = None, strict: bool = True
) -> str:
    """Add the LoRA in `path` to the pipeline (in place) as adapter `name` (default: the file's stem).

    The transformer part goes to `pipe.transformer`, each text-encoder part to `pipe.encoders[role]`
    (`clip_l`, `clip_g`, `t5`; layouts: convert/lora_formats.py); a file may hold any of them. Weights
    for an encoder the pipeline does not have (T5 left out, `lora_te2_` CLIP-bigG in a FLUX file) or
    that takes no LoRA (FLUX.2's LLM) are an error naming it, as are keys matching no layer; strict=False skips them with a warning. Either
    every part loads or none changes. scale: the user strength of every part (a finite number). Returns the
    adapter name. Errors name the file.
    """
    if not math.isfinite(scale):
        raise ValueError(f"{path}: LoRA scale must be a finite number, got {scale}")
    check_input_width(pipe, path)
    try:
        parts = lora_parts(path, pipe.family)
    except CheckpointError as e:
        raise e if str(path) in str(e) else CheckpointError(f"{path}: {e}") from None
    models: dict[str, nn.Module] = {}
    for part, keys in parts.items():
        model = pipe.transformer if part == "transformer" else pipe.encoders.get(part) if part else None
        if model is not None and (part == "transformer" or part in ENCODER_ROLES):
            models[part] = model
            continue
        if model is not None:
            problem = (f"{len(keys)} LoRA key(s) for the {part} text encoder, which takes no LoRA here (nor in "
                       f"Diffusers' {pipe.family} pipelines, which load the transformer's part only)")
        elif part:
            problem = f"{len(keys)} LoRA key(s) for the {part} text encoder, which this pipeline does not have"
        else:
            problem = f"{len(keys)} LoRA key(s) for no text encoder of a {pipe.family} pipeline"
        if strict:
            raise CheckpointError(f"{path}: {problem}, first: {keys[0]!r}; pass strict=False to load the rest")
        warnings.warn(f"{path}: {problem}: not applied")
    if not models:
        raise CheckpointError(f"{path}: no LoRA weights for this pipeline in the file")
    done: list[nn.Module] = []
    try:
        for part, model in models.items():
            if part == "transformer":
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", r".*text-encoder LoRA key")  # they load here too
                    name = load_lora(model, path, scale, name, strict)
            else:
                name = load_text_encoder_lora(model, path, part, pipe.family, scale, name, strict)
            done.append(model)
    except Exception:
        for model in done:
            remove_lora(model, name)
        raise
    return name
