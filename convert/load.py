"""Detect what a transformer checkpoint is (from its keys, shapes and config.json, never its name) and load it.

Layouts read: BFL single files (bare keys or `model.diffusion_model.`), SAI single files
(`model.diffusion_model.`, bundled `text_encoders.*` / `first_stage_model.*` left for their own
loaders), and Diffusers-format transformer folders (`config.json` + safetensors, sharded or not);
each family's layouts are described by its module in convert/families.py. The model is built on
the meta device and materialized straight into the requested dtype and device with a strict,
key-by-key load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mmdit import build_model

from .families import FAMILIES
from .files import (
    NOT_TRANSFORMER,
    TRANSFORMER_PREFIXES,
    Checkpoint,
    CheckpointError,
    load_state_dict_strict,
    read_config,
)
from .mapping import KeyMap


@dataclass
class Detected:
    family: str  # a key of FAMILIES: "flux2" | "flux" | "sd3"
    layout: str  # the family's NATIVE ("bfl" | "sai") or "diffusers"
    variant: str
    params: object  # FluxParams | Flux2Params | SD3Params
    ckpt: Checkpoint  # the transformer's keys, prefix removed
    keymap: KeyMap | None  # None: keys are ours already
    source: str

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.ckpt.storage_dtype()

    @property
    def num_params(self) -> int:
        return sum(math.prod(self.ckpt.shape(k)) for k in self.ckpt)


def detect_transformer(path) -> Detected:
    """What the transformer in `path` is: a single file, a Diffusers `transformer/` folder or its repo folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if (path / "transformer").is_dir():  # a Diffusers repo folder
        path = path / "transformer"
    config = read_config(path / "config.json")  # None beside a single file
    ckpt = Checkpoint.open(path)  # refuses quantized formats we do not read, naming them
    found = find_transformer(ckpt, config, str(path))
    if found is None:
        known = ", ".join(f"{family} ({layout.NATIVE} or Diffusers)" for family, layout in FAMILIES.items())
        first = ", ".join(list(transformer_part(ckpt))[:3])
        raise CheckpointError(f"{path}: unsupported layout: not a transformer of {known}; first keys: {first}")
    return found


def transformer_part(ckpt: Checkpoint) -> Checkpoint:
    """The transformer's keys of a file: those under its prefix, else all but the other parts'."""
    return ckpt.part(TRANSFORMER_PREFIXES) or ckpt.without_prefixes(NOT_TRANSFORMER)


def find_transformer(ckpt: Checkpoint, config: dict | None, src: str) -> Detected | None:
    """The transformer of an open checkpoint (and its folder's config.json), or None if it holds none."""
    ckpt = transformer_part(ckpt)
    cls = (config or {}).get("_class_name", "")
    for family, layout in FAMILIES.items():
        if layout.NATIVE_PROBE in ckpt:
            p = _params(layout.params_from_native, ckpt, src)
            return Detected(family, layout.NATIVE, layout.variant_name(p), p, ckpt, None, src)
        if cls == layout.DIFFUSERS_CLASS or layout.DIFFUSERS_PROBE in ckpt:
            if config is None:
                raise CheckpointError(
                    f"{src}: Diffusers-layout {family} weights need the folder's config.json beside them"
                )
            p = _params(layout.params_from_diffusers_config, config, src)
            return Detected(family, "diffusers", layout.variant_name(p), p, ckpt, layout.diffusers_keymap(p), src)
    return None


def _params(read, arg, src: str):
    """`read(arg)` (a family's params reader), its errors naming the file; params the shapes or config make
    invalid (heads that do not divide the width, ...) are refused the same way."""
    try:
        return read(arg)
    except CheckpointError as e:
        raise CheckpointError(str(e) if src in str(e) else f"{src}: {e}") from None
    except ValueError as e:  # a params dataclass's own check
        raise CheckpointError(f"{src}: its shapes and config give an invalid model: {e}") from None


def load_transformer(path, device="cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load a FLUX, FLUX.2 or SD3 transformer from any supported layout; family and config come from the file.

    dtype: defaults to the file's own (float8 files are upcast to bfloat16).
    """
    d = detect_transformer(path)
    dtype = dtype or d.ckpt.load_dtype()
    tensors = d.ckpt.loaders(dtype, device) if d.keymap is None else d.keymap.tensors(d.ckpt, dtype, device)
    with torch.device("meta"):
        model = build_model(d.params)
    load_state_dict_strict(model, tensors, f"{d.family} transformer ({d.variant})", d.source)
    model.variant = d.variant
    return model.eval().requires_grad_(False)
