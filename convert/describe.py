"""What a file or folder is, from its keys, shapes, header and configs (no weight is loaded): `python -m convert inspect`.

Every kind the project loads is described: transformers (family, layout, variant, dims), text
encoders (T5, CLIP), autoencoders, LoRA files (format, ranks, alphas, the family and number of
modules they target, text-encoder parts, full-weight deltas), the parts of a Diffusers folder or of
an all-in-one single file, and quantized files (which format, and whether it is read). Anything else
is a CheckpointError naming the file.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from mmdit import build_model

from .autoencoder import autoencoder_part, autoencoder_shapes, params_from_shapes
from .autoencoder_flux2 import is_flux2_autoencoder
from .errors import UnsupportedQuantization
from .families import FAMILIES
from .files import Checkpoint, CheckpointError, Shapes, read_config
from .load import Detected, find_transformer
from .lora_formats import delta_targets, detect_format, group_keys, is_lora, lora_part, model_targets, strip_prefix
from .llm import PROBE as LLM_PROBE
from .llm import llm_config, text_stack_prefix
from .lora_pieces import lora_config
from .quant import SUPPORTED
from .text_encoders import encoder_config, encoder_shapes, find_encoders

PART_FOLDERS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")  # of a Diffusers folder


def describe(path) -> str:
    """A readable description of `path`: a file, a component folder, or a Diffusers pipeline folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir() and any((path / f).is_dir() for f in PART_FOLDERS):
        parts = [_part(path / f) for f in PART_FOLDERS if (path / f).is_dir()]
        return f"{path}: a Diffusers folder\n\n" + "\n\n".join(parts)
    if path.is_dir() and (path / "config.json").is_file():  # a part folder, weights or not
        return _part(path)
    return describe_one(path)


def _part(folder: Path) -> str:
    """A part folder of a Diffusers folder; one without weights (the tiny model's pixel codec) says so."""
    if not any(folder.glob("*.safetensors")):
        cls = (read_config(folder / "config.json") or {}).get("_class_name", "no config.json")
        return f"{folder}: no weights ({cls})"
    return describe_one(folder)


def describe_one(path: Path) -> str:
    """One safetensors file, or one folder of them (with its config.json): each part it holds."""
    config = read_config(path / "config.json") if path.is_dir() else None
    try:
        ckpt = Checkpoint.open(path)
    except UnsupportedQuantization as e:
        fields = {"quantization": f"{e.format}: not read", "this project reads": SUPPORTED}
        return _lines(f"{path}: a quantized file", fields)
    if "mmdit.step" in ckpt.metadata:
        return _lines(f"{path}: a training checkpoint of `mmdit train`",
                      {"step": ckpt.metadata["mmdit.step"], "tensors": len(ckpt)})
    if is_lora(ckpt):
        return describe_lora(ckpt, str(path))
    sections, problems = [], []
    for part in _parts(ckpt, config, path):
        try:
            text = part()
        except CheckpointError as e:  # a part that would not load: said, after the parts that would
            problems.append(str(e))
            continue
        if text:
            sections.append(text)
    if not sections:
        if problems:
            raise CheckpointError(problems[0])
        first = ", ".join(list(ckpt)[:3])
        raise CheckpointError(
            f"{path}: not a file this project loads (a {' or '.join(FAMILIES)} transformer, a T5, CLIP or LLM "
            f"text encoder, an autoencoder or a LoRA); first keys: {first}"
        )
    return "\n\n".join(sections + [f"also found, but it would not load: {p}" for p in problems])


def _parts(ckpt: Checkpoint, config, path: Path) -> list:
    """A describer for each part the file may hold: its transformer, each text encoder, its autoencoder."""
    def transformer():
        found = find_transformer(ckpt, config, str(path))
        return None if found is None else describe_transformer(found)

    def encoder(prefix: str, layout: str):
        part = ckpt.with_prefix(prefix)
        what, cfg = encoder_config(Shapes(encoder_shapes(part, layout), str(path)), layout, config, str(path))
        fields = {"prefix": prefix or "(none)", "dtype": part.describe_storage(), "tensors": len(part), **asdict(cfg)}
        return _lines(f"{path}: {what}", fields)

    def llm():
        if not any(k.endswith(LLM_PROBE) for k in ckpt):
            return None
        prefix = text_stack_prefix(ckpt, str(path))
        fields = {"prefix": prefix or "(none)", "dtype": ckpt.describe_storage(), "tensors": len(ckpt)}
        if config is not None:
            cfg = llm_config(config, None, str(path))
            fields |= {"layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                       "heads (query, key-value)": f"{cfg.num_attention_heads}, {cfg.num_key_value_heads}",
                       "FLUX.2 context": f"hidden states {list(cfg.out_layers)} stacked: {len(cfg.out_layers) * cfg.hidden_size} wide"}
            return _lines(f"{path}: a {cfg.arch} LLM text encoder (FLUX.2)", fields)
        return _lines(f"{path}: an LLM text stack (FLUX.2's text encoder; its config.json tells Qwen3 from Mistral)", fields)

    def autoencoder():
        ae = autoencoder_part(ckpt)
        if ae is not None and is_flux2_autoencoder(ae):
            z = ae.shape("bn.running_mean")[0]
            fields = {"layout": "BFL" if "encoder.quant_conv.weight" in ae else "diffusers",
                      "dtype": ae.describe_storage(), "tensors": len(ae),
                      "latents": f"normalized by batch-norm statistics over {z} patchified channels"}
            return _lines(f"{path}: a FLUX.2 autoencoder", fields)
        if ae is None or "decoder.conv_in.weight" not in ae:
            return None
        shape, keymap = autoencoder_shapes(ae, str(path))
        p = params_from_shapes(shape, "flux")
        fields = {"layout": "LDM" if keymap is None else "diffusers", "dtype": ae.describe_storage(),
                  "tensors": len(ae), "latent channels": p.z_channels, "ch": p.ch, "ch_mult": list(p.ch_mult),
                  "num_res_blocks": p.num_res_blocks, "latent scale, shift": "the pipeline's family's (flux or sd3)"}
        return _lines(f"{path}: an autoencoder", fields)

    encoders = [lambda p=p, la=la: encoder(p, la) for p, la in sorted(find_encoders(ckpt).items())]
    return [transformer, *encoders, llm, autoencoder]


def describe_transformer(d: Detected) -> str:
    fields = {"source": d.source, "family": d.family, "layout": d.layout, "variant": d.variant,
              "dtype": d.ckpt.describe_storage(), "parameters": f"{d.num_params:,}", "tensors": len(d.ckpt)}
    text = _lines(f"{d.source}: a transformer", fields)
    params = (f"    {k} = {list(v) if isinstance(v, tuple) else v}" for k, v in asdict(d.params).items())
    return "\n".join([text, *params])


def describe_lora(ckpt: Checkpoint, source: str) -> str:
    """Format, ranks, alphas, target family and modules, deltas and text-encoder parts of a LoRA file."""
    fmt = detect_format(list(ckpt), source)
    stripped = {s: k for k in ckpt if (s := strip_prefix(fmt, k)) is not None}
    modules, _ = group_keys(list(stripped))
    pairs = {name: {r: stripped[k] for r, k in roles.items()} for name, roles in modules.items()}
    ranks = Counter(ckpt.shape(roles["down"])[0] for roles in pairs.values() if "down" in roles)
    alphas = Counter(_number(ckpt, roles["alpha"]) for roles in pairs.values() if "alpha" in roles and "down" in roles)
    deltas = Counter(r for roles in pairs.values() for r in roles if r in ("diff", "diff_b"))
    family, preset, matched = _family(fmt, modules)
    fields = {
        "format": fmt,
        "targets": f"{family}: {matched} of {len(modules)} module(s) match {preset}'s layout" if family
        else f"no module matches a {' or '.join(FAMILIES)} model's layout ({len(modules)} module(s))",
        "rank": _counts(ranks) or "none (no LoRA pairs)",
        "alpha": _alpha_text(ckpt, fmt, alphas, source),
    }
    if deltas:
        fields["full-weight deltas"] = ", ".join(f"{n} .{r}" for r, n in sorted(deltas.items()))
    parts = Counter(lora_part(k, family or "flux") for k in ckpt if k.endswith(("lora_A.weight", "lora_down.weight")))
    encoders = {role: n for role, n in parts.items() if role not in ("transformer",)}
    if encoders:
        listed = sorted(encoders.items(), key=str)
        fields["text encoders"] = ", ".join(f"{role or 'unknown'}: {n} module(s)" for role, n in listed)
    shown = {k: v for k, v in ckpt.metadata.items() if k != "lora_adapter_metadata"}
    if shown:
        fields["header"] = ", ".join(f"{k}={v if len(v) <= 40 else v[:40] + '...'}" for k, v in sorted(shown.items()))
    return _lines(f"{source}: a LoRA file", fields)


def _family(fmt: str, modules: dict) -> tuple[str | None, str | None, int]:
    """The family and preset whose layout most of the file's modules name, and how many match."""
    names = {(name, r) for name, roles in modules.items() for r in roles}
    best = (None, None, 0)
    for family, layout in FAMILIES.items():
        for preset, params in layout.PRESETS.items():
            with torch.device("meta"):
                model = build_model(params)
            keymap = layout.diffusers_keymap(params)
            known = {(n, r) for n in model_targets(fmt, model, keymap) for r in ("down", "up", "alpha")}
            known |= set(delta_targets(fmt, model, keymap))
            matched = len({name for name, r in names if (name, r) in known})
            if matched > best[2]:
                best = (family, preset, matched)
    return best


def _number(ckpt: Checkpoint, key: str) -> float | str:
    t = ckpt.load(key)
    return f"{t.numel()} values" if t.numel() != 1 else float(t.float().item())


def _alpha_text(ckpt: Checkpoint, fmt: str, alphas: Counter, source: str) -> str:
    if alphas:
        zero = " (0 reads as the rank: kohya)" if fmt == "kohya" and 0 in alphas else ""
        return _counts(alphas) + zero
    if fmt == "diffusers" and "lora_adapter_metadata" in ckpt.metadata:
        cfg = lora_config(ckpt.metadata, "transformer", source)
        text = f"lora_alpha {cfg.get('lora_alpha')}, r {cfg.get('r')} (lora_adapter_metadata)"
        if cfg.get("alpha_pattern"):
            text += f", alpha_pattern {dict(cfg['alpha_pattern'])}"
        return text
    return "none: alpha = rank (scale 1)"


def _counts(c: Counter) -> str:
    """`16 (all 15 modules)` when all are equal, else `4 (x10), 16 (x5)`."""
    if len(c) == 1:
        return f"{_num(next(iter(c)))} (all {c.total()} modules)"
    return ", ".join(f"{_num(v)} (x{n})" for v, n in sorted(c.items(), key=lambda x: str(x[0])))


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def _lines(title: str, fields: dict) -> str:
    width = max(len(k) for k in fields) + 1
    return "\n".join([title, *(f"  {k + ':':{width}} {v}" for k, v in fields.items())])
