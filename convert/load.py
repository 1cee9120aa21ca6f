"""Detect what a transformer checkpoint is (from its keys, shapes and config.json, never its name) and load it.

Layouts read: BFL single files (bare keys or `model.diffusion_model.`), SAI single files
(`model.diffusion_model.`, bundled `text_encoders.*` / `first_stage_model.*` left for their own
loaders), and Diffusers-format transformer folders (`config.json` + safetensors, sharded or not).
The model is built on the meta device and materialized straight into the requested dtype and
device with a strict, key-by-key load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mmdit import build_model

from . import flux as flux_fmt
from . import sd3 as sd3_fmt
from .files import FLOAT8, Checkpoint, CheckpointError, load_state_dict_strict
from .mapping import KeyMap


@dataclass(frozen=True)
class Family:
    """How to recognize one family's layouts and read its config (the native layout's keys are ours)."""

    family: str
    native: str  # "bfl" | "sai"
    probe_native: str  # a key only the native layout has
    params_from_native: Callable
    diffusers_class: str
    probe_diffusers: str
    params_from_diffusers_config: Callable
    diffusers_keymap: Callable[[object], KeyMap]
    variant_name: Callable[[object], str]


FAMILIES = [
    Family("flux", "bfl", flux_fmt.PROBE_BFL, flux_fmt.params_from_bfl, "FluxTransformer2DModel", flux_fmt.PROBE_DIFFUSERS,
           flux_fmt.params_from_diffusers_config, lambda p: flux_fmt.DIFFUSERS_TO_BFL, flux_fmt.variant_name),
    Family("sd3", "sai", sd3_fmt.PROBE_SAI, sd3_fmt.params_from_sai, "SD3Transformer2DModel", sd3_fmt.PROBE_DIFFUSERS,
           sd3_fmt.params_from_diffusers_config, sd3_fmt.diffusers_to_sai, sd3_fmt.variant_name),
]

# Prefixes under which single files carry the transformer, and the parts that belong to other loaders.
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
OTHER_PARTS = ("text_encoders.", "first_stage_model.", "vae.", "cond_stage_model.", "conditioner.")


@dataclass
class Detected:
    family: str  # "flux" | "sd3"
    layout: str  # "bfl" | "sai" | "diffusers"
    variant: str
    params: object  # FluxParams | SD3Params
    ckpt: Checkpoint  # the transformer's keys, prefix removed
    keymap: KeyMap | None  # None: keys are ours already
    source: str

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.ckpt.storage_dtype()

    @property
    def num_params(self) -> int:
        return sum(math.prod(self.ckpt.shape(k)) for k in self.ckpt)

    def build(self) -> torch.nn.Module:
        return build_model(self.params)


def _transformer_folder(path: Path) -> Path:
    """A Diffusers repo folder -> its `transformer/`; a transformer folder stays."""
    if (path / "transformer").is_dir():
        return path / "transformer"
    return path


def detect_transformer(path) -> Detected:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    config = None
    if path.is_dir():
        path = _transformer_folder(path)
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
    ckpt = Checkpoint.open(path)
    src = str(path)

    for prefix in MODEL_PREFIXES:
        if any(k.startswith(prefix) for k in ckpt):
            ckpt = ckpt.with_prefix(prefix)
            break
    else:
        ckpt = ckpt.without_prefixes(OTHER_PARTS)
    if not len(ckpt):
        raise CheckpointError(f"{src}: holds no transformer weights (only {', '.join(OTHER_PARTS)} parts?)")

    cls = (config or {}).get("_class_name", "")
    for f in FAMILIES:
        if f.probe_native in ckpt:
            p = f.params_from_native(ckpt)
            return Detected(f.family, f.native, f.variant_name(p), p, ckpt, None, src)
        if cls == f.diffusers_class or f.probe_diffusers in ckpt:
            if config is None:
                raise CheckpointError(f"{src}: Diffusers-layout {f.family} weights need the folder's config.json beside them")
            p = f.params_from_diffusers_config(config)
            return Detected(f.family, "diffusers", f.variant_name(p), p, ckpt, f.diffusers_keymap(p), src)
    first = ", ".join(list(ckpt)[:3])
    raise CheckpointError(
        f"{src}: unsupported layout: not a FLUX (BFL or Diffusers) or SD3 (SAI or Diffusers) transformer; "
        f"first keys: {first}"
    )


def _ours(d: Detected, dtype: torch.dtype, device) -> dict:
    """Lazy loaders of our state dict."""
    if d.keymap is not None:
        return d.keymap.tensors(d.ckpt, dtype, device)
    return {k: (lambda k=k: d.ckpt.load(k, dtype, device)) for k in d.ckpt}


def load_transformer(path, device="cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load a FLUX or SD3 transformer from any supported layout; family and config come from the file.

    dtype: defaults to the file's own (float8 files are upcast to bfloat16).
    """
    d = detect_transformer(path)
    if dtype is None:
        dtype = d.storage_dtype
        if dtype in FLOAT8:
            dtype = torch.bfloat16
    with torch.device("meta"):
        model = d.build()
    load_state_dict_strict(model, _ours(d, dtype, device), f"{d.family} transformer ({d.variant})", d.source)
    model.variant = d.variant
    return model.eval().requires_grad_(False)
