"""Loading the LoRA files people share into our models, and saving ours in the Diffusers/PEFT format.

`load_lora` detects the format from the keys (convert/lora_formats.py), reads and checks the values
(convert/lora_pieces.py), maps every module to a row slice of one of our Linears, stacks the slices
that land on one Linear into one adapter (A concatenated, B block-diagonal: exact), and adds it to
the model in place (mmdit/lora.py); full-weight deltas (`.diff`, `.diff_b`) join the same adapter
as `WeightDelta`s (all-zero ones are skipped, as Diffusers drops them). A file whose shapes do not fit
is refused: the message names the first key or shape that does not fit.
`load_text_encoder_lora` does the same for the text-encoder part of a file, one encoder (role
`clip_l`, `clip_g` or `t5`) at a time; `sampling.load_pipeline_lora` loads every part of a file.
FLUX.2's LLM text encoder takes no LoRA: Diffusers' FLUX.2 pipelines load the transformer's part only
(`Flux2LoraLoaderMixin._lora_loadable_modules`), so there is no reference to match.

`save_lora` writes `transformer.<Diffusers path>.lora_A/lora_B.weight`: an adapter on a fused
`qkv` becomes `to_q`, `to_k`, `to_v` with A copied and B split by rows (exact). The header holds
`lora_adapter_metadata` (the PEFT LoraConfig kwargs Diffusers reads) and our own `mmdit.*` entries.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from mmdit.lora import add_weight_delta, adapter_names, adapters, set_lora_scale, weight_deltas, wrap_linear

from .families import FAMILIES
from .files import Checkpoint, CheckpointError, save_safetensors_atomic
from .lora_formats import ENCODER_ROLES, Target, diffusers_targets, lora_part
from .lora_pieces import Delta, Parsed, Piece, read_pieces, text_encoder_pieces
from .mapping import KeyMap, swap_halves


def diffusers_keymap(model: nn.Module) -> KeyMap:
    """The Diffusers -> ours key map of the model's family (convert/families.py)."""
    family = getattr(model, "family", None)
    if family not in FAMILIES:
        raise TypeError(f"LoRA files apply to transformers of {', '.join(FAMILIES)}, not {type(model).__name__}")
    return FAMILIES[family].diffusers_keymap(model.params)


def _describe(model: nn.Module) -> str:
    """How messages name a transformer: its variant when load_transformer set one, else its family."""
    return f"this {getattr(model, 'variant', None) or model.family} model"


def _check(model: nn.Module, p: Piece, source: str, what: str) -> tuple[int, int]:
    """The rows (offset, length) the piece covers; a clear error if its shapes do not fit the Linear."""
    m = model.get_submodule(p.target.module)
    (r, n_in), (n_out, r_up) = p.down.shape, p.up.shape
    length = p.target.length if p.target.length is not None else m.out_features - p.target.offset
    if r != r_up:
        raise CheckpointError(
            f"{source}: LoRA {p.source!r} has down {list(p.down.shape)} and up {list(p.up.shape)}: "
            f"their ranks ({r}, {r_up}) differ"
        )
    if n_in != m.in_features or n_out != length:
        raise CheckpointError(
            f"{source}: LoRA {p.source!r} has down {list(p.down.shape)} and up {list(p.up.shape)}, but "
            f"{p.target.module} of {what} takes {m.in_features} inputs and needs {length} output rows"
            " (a LoRA for another base model?)"
        )
    return p.target.offset, n_out


def _delta_rows(model: nn.Module, deltas: list[Delta], source: str, what: str) -> tuple[int, torch.Tensor]:
    """One parameter's deltas as one (first row, D): shapes checked, Diffusers' swapped halves undone, split
    parts (`to_q`, `to_k`, `to_v` of a fused bias) placed on their rows."""
    param = deltas[0].target.module
    p = model.get_parameter(param)
    rows = []
    for d in deltas:
        t = d.target
        length = t.length if t.length is not None else (p.shape[0] - t.offset if p.dim() else None)
        expected = [] if p.dim() == 0 else [length, *p.shape[1:]]
        if list(d.value.shape) != expected:
            raise CheckpointError(
                f"{source}: {d.source!r} has shape {list(d.value.shape)}, but {param} of {what} needs "
                f"{expected} (a LoRA for another base model?)"
            )
        rows.append((t.offset, swap_halves(d.value.float()) if t.swap else d.value.float()))
    if p.dim() == 0:
        return 0, sum(v for _, v in rows)
    lo, hi = min(o for o, _ in rows), max(o + v.shape[0] for o, v in rows)
    D = torch.zeros(hi - lo, *p.shape[1:])
    for o, v in rows:
        D[o - lo : o - lo + v.shape[0]] += v
    return lo, D


class Stacked(NamedTuple):
    """One Linear's pieces as one adapter on its rows [offset, offset + length)."""

    A: torch.Tensor  # (R, in): the pieces' down matrices, concatenated
    B: torch.Tensor  # (length, R): their up matrices, block-diagonal
    scale: float
    offset: int


def _stack(model: nn.Module, pieces: list[Piece], source: str, what: str) -> Stacked:
    """One Linear's pieces as one adapter (exact: the stacked product is the sum of the pieces')."""
    rows = [_check(model, p, source, what) for p in pieces]
    lo, hi = min(o for o, _ in rows), max(o + n for o, n in rows)
    scale = next((p.scale for p in pieces if p.scale), 0.0)  # all 0 (alpha 0, PEFT's rule): an adapter of scale 0
    A = torch.cat([p.down.float() for p in pieces])  # (R, in)
    B = torch.zeros(hi - lo, A.shape[0])  # block-diagonal (length, R)
    col = 0
    for p, (o, n) in zip(pieces, rows):
        up = p.up.float() * (p.scale / scale if scale else 1.0)  # one scale per adapter: fold any other into B
        B[o - lo : o - lo + n, col : col + up.shape[1]] = swap_halves(up) if p.target.swap else up
        col += up.shape[1]
    return Stacked(A, B, scale, lo)


def _open(model: nn.Module, path: Path, name: str | None, family: str, what: str) -> tuple[str, Checkpoint]:
    """The adapter name (default: the file's stem, free in `model`) and the file, refused if made for another
    family or if it is not a LoRA file (a training checkpoint)."""
    name = name or re.sub(r"\W", "_", path.stem)
    if name in adapter_names(model):
        raise ValueError(f"the model already has a LoRA adapter {name!r}: pass another name")
    ckpt = Checkpoint.open(path)
    if "mmdit.step" in ckpt.metadata:  # training/checkpoint.py's marker
        raise CheckpointError(f"{path}: a training checkpoint of mmdit train (step {ckpt.metadata['mmdit.step']}), "
                              "not a LoRA file: pass the run's lora.safetensors, written when the run ends "
                              "(mmdit train --output RUN --resume finishes an interrupted run)")
    file_family = ckpt.metadata.get("mmdit.family")
    if file_family and file_family != family:
        raise CheckpointError(f"{path}: a LoRA for a {file_family} model, not for {what}")
    return name, ckpt


def _add(
    model: nn.Module, parsed: Parsed, name: str, scale: float, strict: bool, source: str, what: str, part: str,
) -> None:
    """Add the pieces and deltas to `model` as adapter `name`, after every check (keys that match nothing:
    an error, or with strict=False a warning; nothing at all to add: an error)."""
    unmatched, found = parsed.unmatched, parsed.pieces or parsed.deltas
    if unmatched and (strict or not found):
        raise CheckpointError(
            f"{source}: {len(unmatched)} LoRA key(s) match no layer of {what}, first: {unmatched[0]!r}"
            + ("; pass strict=False to load the rest" if found else "; none matches")
        )
    if unmatched:
        warnings.warn(f"{source}: {len(unmatched)} LoRA key(s) match nothing and are not applied: {unmatched}")
    if not found:
        raise CheckpointError(f"{source}: no {part} LoRA weights in the file")

    by_module: dict[str, list[Piece]] = {}
    for p in parsed.pieces:
        by_module.setdefault(p.target.module, []).append(p)
    by_param: dict[str, list[Delta]] = {}
    for d in parsed.deltas:
        by_param.setdefault(d.target.module, []).append(d)
    stacked = {mod: _stack(model, ps, source, what) for mod, ps in by_module.items()}  # every check before any change
    deltas = {param: _delta_rows(model, ds, source, what) for param, ds in by_param.items()}
    for mod, s in stacked.items():
        rank = s.A.shape[0]
        a = wrap_linear(model, mod).add(name, rank, s.scale * rank, (s.offset, s.B.shape[0]))  # alpha = scale * rank
        with torch.no_grad():
            a.lora_A.copy_(s.A)
            a.lora_B.copy_(s.B)
    for param, (offset, D) in deltas.items():
        if D.any():  # all-zero deltas change nothing (Diffusers drops them)
            add_weight_delta(model, param, name, D, offset)
    if name in adapter_names(model):
        set_lora_scale(model, name, scale)


def load_lora(
    model: nn.Module, path: str | os.PathLike, scale: float = 1.0, name: str | None = None, strict: bool = True
) -> str:
    """Add the LoRA in `path` to `model` (in place) as adapter `name` (default: the file's stem).

    scale: the user strength. strict=False loads a file some of whose keys match nothing in the
    model, with a warning listing them; by default that is an error. Text-encoder LoRA weights in
    the file are not applied here (a warning says so): `load_text_encoder_lora` or
    `sampling.load_pipeline_lora` load them. Returns the adapter name.
    """
    path = Path(path)
    keymap = diffusers_keymap(model)
    what = _describe(model)
    name, ckpt = _open(model, path, name, model.family, what)
    tensors = {k: ckpt.load(k) for k in ckpt}
    parsed, skipped = read_pieces(tensors, ckpt.metadata, model, keymap, str(path))
    if skipped:
        how = "load them with sampling.load_pipeline_lora" if takes_encoder_lora(model.family) else \
            f"the text encoder of a {model.family} model takes no LoRA"
        warnings.warn(f"{path}: {len(skipped)} text-encoder LoRA key(s) are not applied to the transformer, "
                      f"first: {skipped[0]!r} ({how})")
    _add(model, parsed, name, scale, strict, str(path), what, "transformer")
    return name


def load_text_encoder_lora(
    encoder: nn.Module, path: str | os.PathLike, role: str, family: str,
    scale: float = 1.0, name: str | None = None, strict: bool = True,
) -> str:
    """Add the text-encoder `role` part of the LoRA in `path` to our `encoder` (in place) as adapter `name`.

    role: `clip_l`, `clip_g` or `t5`, as a pipeline holds its encoders; family: `flux` or `sd3`, which
    the Diffusers layout needs (its `text_encoder_2.` is T5 for FLUX, CLIP-bigG for SD3). Layouts:
    convert/lora_formats.py (`text_encoder.<HF path>.lora_A.weight`, `lora_te1_<HF path with _>.lora_down.weight`,
    ...). Keys of the other parts are ignored; scale, name, strict and the return value as `load_lora`.
    """
    if role not in ENCODER_ROLES:
        raise ValueError(f"role {role!r}: expected one of {', '.join(ENCODER_ROLES)}")
    path = Path(path)
    what = f"the {role} text encoder"
    name, ckpt = _open(encoder, path, name, family, what)
    tensors = {k: ckpt.load(k) for k in ckpt if lora_part(k, family) == role}
    parsed = text_encoder_pieces(tensors, ckpt.metadata, encoder, role, family, str(path))
    _add(encoder, parsed, name, scale, strict, str(path), what, f"{role} text-encoder")
    return name


def takes_encoder_lora(family: str) -> bool:
    """Whether any text encoder of the family's pipelines takes a LoRA (FLUX.2's LLM does not)."""
    return any(role in ENCODER_ROLES for role in FAMILIES[family].DIFFUSERS_TEXT_ENCODERS.values())


def lora_parts(path: str | os.PathLike, family: str) -> dict[str | None, list[str]]:
    """The keys of a LoRA file by the part they are for: `transformer`, an encoder role (`clip_l`,
    `clip_g`, `t5`), or None (a text encoder the family's pipelines do not have)."""
    parts: dict[str | None, list[str]] = {}
    for k in Checkpoint.open(path):
        parts.setdefault(lora_part(k, family), []).append(k)
    return parts


def save_lora(
    model: nn.Module, path: str | os.PathLike, name: str = "default", metadata: dict | None = None
) -> None:
    """Write adapter `name` as a Diffusers/PEFT LoRA file (loads with Diffusers' `load_lora_weights`).

    metadata: extra header entries (e.g. TACA settings); values that are not strings are stored as JSON.
    """
    if any(True for _ in weight_deltas(model, name)):
        raise ValueError(f"adapter {name!r} has full-weight deltas (.diff): the Diffusers/PEFT format cannot hold "
                         "them (mmdit.lora.lora_state_dict writes the ComfyUI layout, which can)")
    by_ours: dict[str, list[tuple[str, Target]]] = {}
    for path_d, t in diffusers_targets(model, diffusers_keymap(model)).items():
        by_ours.setdefault(t.module, []).append((path_d, t))
    tensors, ranks, alphas, ours = {}, {}, {}, []
    for mod, _, a in adapters(model, name):
        if mod not in by_ours:
            raise ValueError(f"LoRA on {mod}: the Diffusers layout has no module for it, cannot save")
        ours.append(mod)
        for path_d, t in by_ours[mod]:
            lo, hi = max(t.offset, a.offset), min(t.offset + t.length, a.offset + a.length)
            if lo >= hi:
                continue  # e.g. proj_mlp when the adapter covers linear1's q, k, v rows only
            B = torch.zeros(t.length, a.rank, dtype=a.lora_B.dtype)
            B[lo - t.offset : hi - t.offset] = a.lora_B.detach()[lo - a.offset : hi - a.offset]
            tensors[f"transformer.{path_d}.lora_A.weight"] = a.lora_A.detach().clone()  # no shared storage
            tensors[f"transformer.{path_d}.lora_B.weight"] = swap_halves(B) if t.swap else B
            ranks[path_d], alphas[path_d] = a.rank, a.alpha
    if not tensors:
        raise KeyError(f"no LoRA adapter {name!r} in the model (adapters: {adapter_names(model) or 'none'})")

    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {  # PEFT LoraConfig kwargs, as Diffusers' save_lora_weights writes them
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
        "use_dora": False,
        "use_rslora": False,
        "lora_bias": False,
    }
    header = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()}, sort_keys=True),
        "mmdit.family": model.family,
        "mmdit.variant": str(getattr(model, "variant", "") or ""),
        "mmdit.rank": str(r),
        "mmdit.alpha": f"{alpha:g}",
        "mmdit.targets": json.dumps(sorted(ours)),
    }
    for k, v in (metadata or {}).items():
        if k in header:
            raise ValueError(f"metadata key {k!r} is reserved")
        header[k] = v if isinstance(v, str) else json.dumps(v)
    save_safetensors_atomic(tensors, path, header)
