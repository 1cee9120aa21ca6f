"""The LoRA file formats in use (FLUX, FLUX.2, SD3.5): how each names its modules, and where they land in our model.

Every format is a set of (module, down, up, alpha) triples, sometimes with full-weight deltas; what
differs is the module naming, the tensor names, and where alpha comes from (docs/formats.md, "LoRA
formats", gives the sources; convert/lora_pieces.py reads the values):

| format | keys | scale (before the user's strength) |
|---|---|---|
| Diffusers / PEFT, ai-toolkit | `transformer.<diffusers path>.lora_A/lora_B.weight` | `.alpha` keys, else `lora_adapter_metadata`, else 1 |
| kohya sd-scripts | `lora_unet_<our path, dots as _>.lora_down/lora_up.weight`, `.alpha` | alpha / rank, 1 without alpha |
| ComfyUI / BFL | `[diffusion_model.]<our path>.lora_A/B` or `.lora_down/up`, `.alpha` | alpha / rank, 1 without alpha |
| PEFT on BFL's model (FLUX.2) | `base_model.model.<our path>.lora_A/lora_B.weight` | as ComfyUI / BFL |
| XLabs | `[diffusion_model.]double_blocks.N.processor.qkv_lora1.down.weight`, ... | 1 |

Full-weight deltas (ComfyUI `comfy/lora.py`, LyCORIS `lycoris/modules/full.py`; trainers write them for
norms and biases): `<module>.diff` is added to the module's weight (or to its one parameter, e.g. FLUX's RMSNorm
`scale`), `<module>.diff_b` to its bias, `<parameter>.diff` to a parameter not called `weight`; kohya
names write the module with `_`, the Diffusers layout its own module paths (split parts land on rows).

Diffusers paths of split projections (`to_q`, `proj_mlp`, ...) become row slices of our fused
Linears; the adaLN stored as (scale, shift) by Diffusers gets its LoRA's output rows (B) swapped.
FLUX.2 (Diffusers `loaders/lora_pipeline.py` `Flux2LoraLoaderMixin.lora_state_dict` and
`loaders/lora_conversion_utils.py` `_convert_non_diffusers_flux2_lora_to_diffusers`): ai-toolkit writes the
BFL layout (`diffusion_model.`, lora_A/B, no alpha: scale 1); some files name the blocks in Diffusers'
words there (`diffusion_model.transformer_blocks.0.attn.to_q`, `single_transformer_blocks.`, and
`sformer_blocks.` for `transformer_blocks.`), which land as Diffusers paths do; PEFT's own
`base_model.model.` prefix is read as `diffusion_model.` (other families refuse it, as Diffusers' loaders do).
XLabs' own pipeline multiplies both down and up by its `lora_weight`, i.e. strength w there is w²
here; we follow Diffusers (strength is linear). BFL control LoRAs (`lora_B.bias`, replaced norm
scales), DoRA and LyCORIS' LoKr / LoHa are refused with a message saying so.

Text-encoder weights in the same files are read per encoder role (our pipelines' `clip_l`,
`clip_g`, `t5`) onto Hugging Face module paths, which our encoders share (`text_model.encoder.
layers.N.self_attn.q_proj`, `encoder.block.N.layer.0.SelfAttention.q`); alpha as above:

| format | keys |
|---|---|
| Diffusers / PEFT | `text_encoder.<HF path>.lora_A/lora_B.weight` (FLUX: CLIP-L, `text_encoder_2.`: T5; SD3: CLIP-L, `text_encoder_2.`: CLIP-bigG, `text_encoder_3.`: T5); the HF path may lack `text_model.` (transformers 5's CLIPTextModel) |
| kohya sd-scripts | `lora_te1_<HF path, dots as _>.lora_down/lora_up.weight`, `.alpha`: te1 CLIP-L (`lora_te_` too), te2 CLIP-bigG, te3 T5 |
| ComfyUI | `text_encoders.{clip_l,clip_g,t5xxl}.transformer.<HF path>.lora_down/lora_up.weight`, `.alpha` |

Diffusers' own loaders apply the CLIP parts only (FLUX: `text_encoder.`; SD3: `text_encoder.`,
`text_encoder_2.`; kohya: te1) and drop T5's; we apply T5's too.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace

from torch import nn

from .families import FAMILIES
from .files import BUNDLED_ENCODERS, TRANSFORMER_PREFIXES, CheckpointError
from .mapping import KeyMap

# Keys of text-encoder parts, whichever the format: Diffusers, ComfyUI, kohya
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "text_encoders.", "lora_te")
ENCODER_ROLES = tuple(BUNDLED_ENCODERS)  # clip_l, clip_g, t5
# the non-Diffusers text-encoder key prefixes -> (role, format), the same for every family
TEXT_ENCODER_KEYS = {
    "lora_te_": ("clip_l", "kohya"), "lora_te1_": ("clip_l", "kohya"), "lora_te2_": ("clip_g", "kohya"),
    "lora_te3_": ("t5", "kohya"), **{prefix: (role, "comfyui") for role, prefix in BUNDLED_ENCODERS.items()},
}

# tensor suffix -> role (down = A (r, in), up = B (out, r); diff, diff_b: full-weight deltas)
_ROLES = {
    "lora_A.weight": "down", "lora_B.weight": "up", "lora_down.weight": "down", "lora_up.weight": "up",
    "down.weight": "down", "up.weight": "up", "alpha": "alpha", "diff": "diff", "diff_b": "diff_b",
}
_KEY = re.compile(r"(.+?)\.(" + "|".join(re.escape(r) for r in _ROLES) + ")")

# FLUX.2 files in the BFL layout that name blocks as Diffusers does: their prefix -> Diffusers' (Diffusers
# `_convert_non_diffusers_flux2_lora_to_diffusers`, `possible_expanded_block_prefixes`)
FLUX2_DIFFUSERS_BLOCKS = {
    "transformer_blocks.": "transformer_blocks.",
    "single_transformer_blocks.": "single_transformer_blocks.",
    "sformer_blocks.": "transformer_blocks.",  # "the legacy `sformer_blocks` alias used by some exports"
}

XLABS = [  # XLabs processor names -> ours, and whether only the q, k, v rows (3 * in_features) are covered
    (r"double_blocks\.(\d+)\.processor\.qkv_lora1", r"double_blocks.\1.img_attn.qkv", False),
    (r"double_blocks\.(\d+)\.processor\.proj_lora1", r"double_blocks.\1.img_attn.proj", False),
    (r"double_blocks\.(\d+)\.processor\.qkv_lora2", r"double_blocks.\1.txt_attn.qkv", False),
    (r"double_blocks\.(\d+)\.processor\.proj_lora2", r"double_blocks.\1.txt_attn.proj", False),
    (r"single_blocks\.(\d+)\.processor\.qkv_lora", r"single_blocks.\1.linear1", True),
    (r"single_blocks\.(\d+)\.processor\.proj_lora", r"single_blocks.\1.linear2", False),
]


@dataclass
class Target:
    """Where a file's module lands in our model: rows [offset, offset + length) of `module`, our Linear
    (a LoRA pair) or our parameter (a full-weight delta)."""

    module: str
    offset: int = 0
    length: int | None = None  # None: all rows from offset (checked against B or the delta)
    swap: bool = False  # the two row halves swapped (Diffusers' (scale, shift) adaLN)


# ---- Diffusers module paths, derived from the model family's Diffusers -> ours KeyMap ----


def _examples(pattern: str, n: int) -> list[str]:
    """Concrete strings for a KeyMap pattern: `(\\d+)` -> 0..n-1, `(a|b)` -> each of a, b; `\\.` -> `.`."""
    options = []
    for i, part in enumerate(re.split(r"\(([^()]*)\)", pattern)):
        if i % 2 == 0:
            options.append([part.replace("\\.", ".")])
        else:
            options.append([str(j) for j in range(n)] if part == r"\d+" else [a.replace("\\.", ".") for a in part.split("|")])
    return [s for s in map("".join, itertools.product(*options)) if re.fullmatch(pattern, s)]


def _index_bound(names) -> int:
    """1 + the largest block index (`double_blocks.N.`, ...) in module names: the indices to expand patterns with."""
    return 1 + max((int(m[1]) for name in names if (m := re.match(r"[^.]+\.(\d+)\.", name))), default=0)


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's own parameters (not those of LoRA adapters)."""
    return {n: p for n, p in model.named_parameters() if ".lora." not in n}


def diffusers_params(model: nn.Module, keymap: KeyMap) -> dict[str, Target]:
    """{Diffusers parameter key: Target(our parameter, rows)} for every parameter of `model` that `keymap` names.

    Parts of a fused tensor are `in_features` rows each (q, k, v) of the Linear they belong to, the
    last one taking the rest (FLUX's `proj_mlp` in `linear1`).
    """
    params = _params(model)
    n = _index_bound(params)
    rules = [(p, r, None) for p, r in keymap.renames] + list(keymap.fused)
    out: dict[str, Target] = {}
    for pat, rep, part in rules:
        for key in _examples(pat, n):
            ours = re.sub(pat, rep, key)
            if ours not in params:
                continue
            swap = any(re.fullmatch(s, ours) for s in keymap.swap)
            rows = None if part is None else model.get_submodule(ours.rpartition(".")[0]).in_features
            out[key] = Target(ours, 0 if part is None else part * rows, rows, swap)
    by_param: dict[str, list[Target]] = {}
    for t in out.values():
        by_param.setdefault(t.module, []).append(t)
    for ours, ts in by_param.items():  # the last part of a fused tensor takes the remaining rows
        ts.sort(key=lambda t: t.offset)
        ts[-1].length = params[ours].shape[0] - ts[-1].offset
    return out


def diffusers_targets(model: nn.Module, keymap: KeyMap) -> dict[str, Target]:
    """{Diffusers Linear path: Target(our Linear, rows)} for every Linear of `model` that `keymap` names."""
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for key, t in diffusers_params(model, keymap).items():
        mod = t.module.removesuffix(".weight")
        if key.endswith(".weight") and t.module.endswith(".weight") and mod in linears:
            out[key.removesuffix(".weight")] = replace(t, module=mod)
    return out


# ---- format detection and key parsing ----


def detect_format(keys: list[str], source: str, family: str | None = None) -> str:
    """`diffusers` | `kohya` | `comfyui` | `peft` | `xlabs`; refused formats raise with the reason, naming
    `source`. family: the model's, where known (`peft`, PEFT's `base_model.model.` keys, is FLUX.2's only)."""
    def has(pred):
        return next((k for k in keys if pred(k)), None)

    if k := has(lambda k: k.endswith(("lora_B.bias", "query_norm.scale"))):
        raise CheckpointError(
            f"{source}: a BFL control LoRA (with LoRA biases and replaced norms, e.g. {k!r}): not supported"
        )
    if k := has(lambda k: "dora_scale" in k or "lora_magnitude_vector" in k):
        raise CheckpointError(f"{source}: a DoRA LoRA (key {k!r}): not supported")
    if k := has(lambda k: ".lokr_" in k or ".hada_" in k):
        raise CheckpointError(f"{source}: a LyCORIS LoKr / LoHa adapter (key {k!r}): not supported, only LoRA pairs "
                              "and full-weight deltas")
    if k := has(lambda k: k.startswith(("lora_", "lycoris_")) and not k.startswith(("lora_unet_", "lora_te"))):
        raise CheckpointError(f"{source}: unsupported LoRA key naming {k!r} (OneTrainer / LyCORIS)")
    if has(lambda k: ".processor." in k):
        return "xlabs"
    if has(lambda k: k.startswith("lora_unet_")):
        return "kohya"
    if has(lambda k: k.startswith("transformer.")):
        return "diffusers"
    if k := has(lambda k: k.startswith("base_model.")):
        if family in (None, "flux2") and k.startswith("base_model.model."):
            return "peft"  # Diffusers' FLUX.2 loader reads it as `diffusion_model.`
        raise CheckpointError(f"{source}: unsupported LoRA layout (PEFT `base_model.model.` keys, e.g. {k!r}; "
                              "Diffusers reads them for FLUX.2 only)")
    return "comfyui"


def group_keys(keys: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """{module: {role: key}} for LoRA tensor names, and the keys that are not LoRA tensors."""
    modules: dict[str, dict[str, str]] = {}
    other = []
    for k in keys:
        m = _KEY.fullmatch(k)
        if m:
            modules.setdefault(m[1], {})[_ROLES[m[2]]] = k
        else:
            other.append(k)
    return modules, other


def is_lora(keys) -> bool:
    """Whether keys look like a LoRA file's (LoRA pairs, alphas or deltas)."""
    return any(_KEY.fullmatch(k) for k in keys)


def strip_prefix(fmt: str, key: str) -> str | None:
    """The key without its format's prefix; None for keys of other components (text encoders)."""
    if key.startswith(TEXT_ENCODER_PREFIXES):
        return None
    prefixes = {"diffusers": ("transformer.",), "kohya": ("lora_unet_",), "peft": ("base_model.model.",)}.get(
        fmt, TRANSFORMER_PREFIXES)
    return next((key[len(p):] for p in prefixes if key.startswith(p)), key)


def model_targets(fmt: str, model: nn.Module, keymap: KeyMap) -> dict[str, Target]:
    """{module name as the format writes it (prefix removed): our Target}."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if fmt == "diffusers":
        return diffusers_targets(model, keymap)
    if fmt == "kohya":
        return {n.replace(".", "_"): Target(n) for n in linears}
    if fmt == "xlabs":
        n = _index_bound(linears)
        return {
            name: Target(ours, 0, 3 * linears[ours].in_features if qkv_only else None)
            for pat, rep, qkv_only in XLABS for name in _examples(pat, n) if (ours := re.sub(pat, rep, name)) in linears
        }
    out = {n: Target(n) for n in linears}  # ComfyUI, BFL, PEFT on BFL's model
    if getattr(model, "family", None) == "flux2":  # block paths in Diffusers' words too
        out |= {alias + path.removeprefix(block): t for path, t in diffusers_targets(model, keymap).items()
                for alias, block in FLUX2_DIFFUSERS_BLOCKS.items() if path.startswith(block)}
    return out


def delta_targets(fmt: str, model: nn.Module, keymap: KeyMap | None = None) -> dict[tuple[str, str], Target]:
    """{(name as the format writes it, "diff" | "diff_b"): our parameter} for the full-weight deltas.

    Native names (ComfyUI, BFL, kohya with `_`, text encoders' HF paths): a module's `.diff` is its
    `weight`, or its one parameter (FLUX's RMSNorm `scale`); `.diff_b` its `bias`; and (not kohya) a
    parameter's own name for one not called `weight` (ComfyUI `comfy/lora.py` `model_lora_keys_unet`).
    Diffusers names: the module's `weight` / `bias` through the key map (a split part lands on rows).
    """
    if fmt == "diffusers":
        params = diffusers_params(model, keymap)
        return {(key.rpartition(".")[0], "diff" if key.endswith(".weight") else "diff_b"): t
                for key, t in params.items() if key.endswith((".weight", ".bias"))}
    kohya = fmt == "kohya"
    out: dict[tuple[str, str], Target] = {}
    for mod_name, m in model.named_modules():
        own = [n for n, _ in m.named_parameters(recurse=False)]
        if not mod_name or not own or ".lora." in f"{mod_name}.":
            continue
        name = mod_name.replace(".", "_") if kohya else mod_name
        weight = "weight" if "weight" in own else own[0] if own != ["bias"] and len(own) == 1 else None
        if weight:
            out[(name, "diff")] = Target(f"{mod_name}.{weight}")
        if "bias" in own:
            out[(name, "diff_b")] = Target(f"{mod_name}.bias")
    if not kohya:
        out |= {(p, "diff"): Target(p) for p in _params(model) if not p.endswith(".weight")}
    return out


# ---- text encoders ----


def text_encoder_prefixes(family: str) -> dict[str, tuple[str, str]]:
    """{text-encoder key prefix: (our encoder role, format)} of the family's LoRA files."""
    if family not in FAMILIES:
        raise ValueError(f"text-encoder LoRAs are for the families {', '.join(FAMILIES)}, not {family!r}")
    diffusers = {f"{c}.": (role, "diffusers") for c, role in FAMILIES[family].DIFFUSERS_TEXT_ENCODERS.items()}
    return diffusers | TEXT_ENCODER_KEYS


def lora_part(key: str, family: str) -> str | None:
    """What a LoRA key is for: `transformer`, an encoder role, or None (a text encoder the family lacks)."""
    role = next((r for p, (r, _) in text_encoder_prefixes(family).items() if key.startswith(p)), None)
    return role or (None if key.startswith(TEXT_ENCODER_PREFIXES) else "transformer")


def encoder_targets(encoder: nn.Module, fmt: str) -> dict[str, Target]:
    """{module name as the format writes it: Target} for every Linear of one of our text encoders:
    the HF module path, also without CLIP's `text_model.`; kohya: dots as `_`."""
    out = {}
    for n, m in encoder.named_modules():
        if isinstance(m, nn.Linear):
            for alias in (n, n.removeprefix("text_model.")):
                out[alias.replace(".", "_") if fmt == "kohya" else alias] = Target(n)
    return out


def encoder_delta_targets(encoder: nn.Module, fmt: str) -> dict[tuple[str, str], Target]:
    """`delta_targets` for one of our text encoders: HF names, also without CLIP's `text_model.`."""
    native = delta_targets("kohya" if fmt == "kohya" else "comfyui", encoder)
    alias = "text_model_" if fmt == "kohya" else "text_model."
    return native | {(name.removeprefix(alias), role): t for (name, role), t in native.items()}
