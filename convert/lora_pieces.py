"""A LoRA file's tensors, read into `Piece`s (down, up, scale on one of our Linears) and `Delta`s (full-weight
deltas on one of our parameters), with the checks on values every format shares.

The scale of a pair is alpha / rank (alpha / √rank with PEFT's `use_rslora`); alpha comes from the
module's `.alpha` key, else the Diffusers header `lora_adapter_metadata` (PEFT's `lora_alpha`,
`alpha_pattern`), else it is the rank. Alpha 0 follows each format's own trainer: kohya sd-scripts
reads it as the rank (`networks/lora_flux.py` `LoRAModule`: `alpha = lora_dim if alpha is None or
alpha == 0`); PEFT (`tuners/lora/layer.py`: `scaling = lora_alpha / r`) and ComfyUI (`comfy/lora.py`:
`alpha / rank`) give scale 0, with a warning. Refused, naming the file and key: a LoRA tensor that is
not floating point, NaN or infinite values, an alpha that is not one finite number >= 0, a malformed
`lora_adapter_metadata`. Deltas are added as they are (times the user's strength; no alpha, as
ComfyUI applies them).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .files import FLOAT8, CheckpointError, Config, parse_json
from .lora_formats import (
    Target,
    delta_targets,
    detect_format,
    encoder_delta_targets,
    encoder_targets,
    group_keys,
    model_targets,
    strip_prefix,
    text_encoder_prefixes,
)
from .mapping import KeyMap


@dataclass
class Piece:
    target: Target
    down: Tensor  # A: (r, in)
    up: Tensor  # B: (length, r)
    scale: float  # alpha / rank from the file
    source: str  # the file's key, for messages


@dataclass
class Delta:
    target: Target  # our parameter and its rows
    value: Tensor  # D: the parameter's shape, or the rows'
    source: str  # the file's key, for messages


@dataclass
class Parsed:
    """What a LoRA file holds for one model: pairs, deltas, and its keys that match nothing there."""

    pieces: list[Piece]
    deltas: list[Delta]
    unmatched: list[str]


def lora_config(metadata: dict[str, str], prefix: str, source: str) -> Config:
    """The PEFT LoraConfig kwargs Diffusers writes under `lora_adapter_metadata` (our prefix's only), checked."""
    raw = metadata.get("lora_adapter_metadata")
    where = f"{source}: header entry 'lora_adapter_metadata'"
    cfg = parse_json(raw, where) if raw else Config({}, where)
    ours = {k[len(prefix) + 1 :]: v for k, v in cfg.items() if k.startswith(prefix + ".")}
    ours = Config(ours, f"{where} ({prefix}.*)")
    ours.get_int("r"), ours.get_float("lora_alpha"), ours.get_bool("use_rslora"), ours.get_bool("use_dora")
    alphas = ours.get_dict("alpha_pattern")
    for key in alphas:
        alphas.get_float(key)
    return ours


def pattern_value(patterns: dict, module: str, default):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: a key matches a module path ending in it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _checked(tensors: dict[str, Tensor], key: str, source: str, dims: int | None = None) -> Tensor:
    """A LoRA tensor, refused by name if it is not floating point, not finite, or not `dims`-dimensional."""
    t = tensors[key]
    if not t.dtype.is_floating_point:
        raise CheckpointError(
            f"{source}: key {key!r} is stored as {str(t.dtype).removeprefix('torch.')}: LoRA weights are floating point"
        )
    if dims is not None and t.dim() != dims:
        raise CheckpointError(f"{source}: key {key!r} has shape {list(t.shape)}, a LoRA matrix has 2 dimensions")
    if not torch.isfinite(t.float() if t.dtype in FLOAT8 else t).all():
        raise CheckpointError(f"{source}: key {key!r} holds NaN or infinite values")
    return t


def _alpha(
    tensors: dict[str, Tensor], key: str | None, cfg: Config, name: str, rank: int, fmt: str, source: str
) -> float:
    """The module's alpha (see the module docstring), checked."""
    if key is not None:
        t, where = tensors[key], f"key {key!r}"
        if t.numel() != 1:
            raise CheckpointError(f"{source}: {where} holds {t.numel()} values {list(t.shape)}: an alpha is one number")
        if t.dtype == torch.bool or t.is_complex():
            raise CheckpointError(f"{source}: {where} is stored as {t.dtype}: an alpha is a number")
        alpha = float(t.float().item())
    else:
        where = f"{cfg.source}, field 'lora_alpha' (or its 'alpha_pattern')"
        alpha = pattern_value(cfg.get_dict("alpha_pattern"), name, cfg.get_float("lora_alpha", rank))
    if not math.isfinite(alpha) or alpha < 0:
        raise CheckpointError(
            f"{source}: {where} is {alpha}: an alpha is a finite number >= 0 (a negative strength subtracts a LoRA)"
        )
    if alpha == 0 and fmt == "kohya":
        return rank  # kohya sd-scripts: alpha 0 means alpha = rank
    return alpha


def module_pieces(
    tensors: dict[str, Tensor], stripped: dict[str, str], targets: dict[str, Target],
    deltas: dict[tuple[str, str], Target], cfg: Config, fmt: str, source: str,
) -> Parsed:
    """The pieces and deltas of the LoRA modules in `stripped` ({key without its prefix: file key}) that land
    on `targets` (Linears) and `deltas` (parameters); also the keys that match nothing."""
    if cfg.get_bool("use_dora"):
        raise CheckpointError(f"{cfg.source}: use_dora: DoRA LoRAs are not supported")
    modules, other = group_keys(list(stripped))
    out = Parsed([], [], [stripped[k] for k in other])
    zero_alpha = []
    for name, roles in modules.items():
        roles = {r: stripped[k] for r, k in roles.items()}
        for role in ("diff", "diff_b"):
            if role in roles:
                t = deltas.get((name, role))
                if t is None:
                    out.unmatched.append(roles[role])
                else:
                    out.deltas.append(Delta(t, _checked(tensors, roles[role], source), roles[role]))
        pair = {r: roles[r] for r in ("down", "up", "alpha") if r in roles}
        if not pair or (pair.keys() == {"alpha"} and ("diff" in roles or "diff_b" in roles)):
            continue  # deltas only (an alpha there has nothing to scale)
        if "down" not in pair or "up" not in pair:
            missing = " and ".join(r for r in ("down", "up") if r not in pair)
            raise CheckpointError(f"{source}: LoRA module {name!r} lacks its {missing} matrix")
        if name not in targets:
            out.unmatched += pair.values()
            continue
        down, up = _checked(tensors, pair["down"], source, 2), _checked(tensors, pair["up"], source, 2)
        rank = down.shape[0]
        alpha = _alpha(tensors, pair.get("alpha"), cfg, name, rank, fmt, source)
        if alpha == 0:
            zero_alpha.append(pair.get("alpha", "lora_alpha"))
        scale = alpha / (math.sqrt(rank) if cfg.get_bool("use_rslora") else rank)
        out.pieces.append(Piece(targets[name], down, up, scale, pair["down"]))
    if zero_alpha:
        warnings.warn(f"{source}: alpha 0 ({zero_alpha[0]!r}, {len(zero_alpha)} module(s)): scale 0, as PEFT and "
                      "ComfyUI read it; these modules change nothing")
    return out


def read_pieces(
    tensors: dict[str, Tensor], metadata: dict[str, str], model: nn.Module, keymap: KeyMap, source: str
) -> tuple[Parsed, list[str]]:
    """All pieces and deltas of a LoRA file for `model` (the keys matching nothing among them); also the
    text-encoder keys, which are not read here."""
    fmt = detect_format(list(tensors), source, getattr(model, "family", None))
    stripped, skipped = {}, []  # {key without prefix: file key}, text-encoder keys
    for k in tensors:
        s = strip_prefix(fmt, k)
        if s is None:
            skipped.append(k)
        else:
            stripped[s] = k
    cfg = lora_config(metadata if fmt == "diffusers" else {}, "transformer", source)
    targets, deltas = model_targets(fmt, model, keymap), delta_targets(fmt, model, keymap)
    return module_pieces(tensors, stripped, targets, deltas, cfg, fmt, source), skipped


def text_encoder_pieces(
    tensors: dict[str, Tensor], metadata: dict[str, str], encoder: nn.Module, role: str, family: str, source: str
) -> Parsed:
    """All pieces and deltas of a LoRA file for our text encoder `role` of a `family` pipeline, and its keys
    that match nothing in the encoder. Keys of the other parts are ignored."""
    detect_format(list(tensors), source, family)  # refuses DoRA, control LoRAs, ...
    out = Parsed([], [], [])
    for prefix, (r, fmt) in text_encoder_prefixes(family).items():
        stripped = {k[len(prefix):]: k for k in tensors if k.startswith(prefix)}
        if r != role or not stripped:
            continue
        cfg = lora_config(metadata if fmt == "diffusers" else {}, prefix[:-1], source)
        p = module_pieces(tensors, stripped, encoder_targets(encoder, fmt), encoder_delta_targets(encoder, fmt),
                          cfg, fmt, source)
        out = Parsed(out.pieces + p.pieces, out.deltas + p.deltas, out.unmatched + p.unmatched)
    return out
