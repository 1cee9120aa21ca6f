"""The LoRA file formats in use for FLUX and SD3.5, read into one form: `Piece`s on our Linears.

Every format is a set of (module, down, up, alpha) triples; what differs is the module naming, the
tensor names, and where alpha comes from (docs/formats.md, "LoRA formats", gives the sources):

| format | keys | scale (before the user's strength) |
|---|---|---|
| Diffusers / PEFT, ai-toolkit | `transformer.<diffusers path>.lora_A/lora_B.weight` | `.alpha` keys, else `lora_adapter_metadata`, else 1 |
| kohya sd-scripts | `lora_unet_<our path, dots as _>.lora_down/lora_up.weight`, `.alpha` | alpha / rank, 1 without alpha |
| ComfyUI / BFL | `[diffusion_model.]<our path>.lora_A/B` or `.lora_down/up`, `.alpha` | alpha / rank, 1 without alpha |
| XLabs | `[diffusion_model.]double_blocks.N.processor.qkv_lora1.down.weight`, ... | 1 |

Diffusers paths of split projections (`to_q`, `proj_mlp`, ...) become row slices of our fused
Linears; the adaLN stored as (scale, shift) by Diffusers gets its LoRA's output rows (B) swapped.
XLabs' own pipeline multiplies both down and up by its `lora_weight`, i.e. strength w there is w²
here; we follow Diffusers (strength is linear). BFL control LoRAs (`lora_B.bias`, replaced norm
scales), DoRA and full-weight diffs (`.diff`, `.diff_b`) are refused with a message saying so.

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
import json
import math
import re
from dataclasses import dataclass

from torch import Tensor, nn

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

# tensor suffix -> role (down = A (r, in), up = B (out, r))
_ROLES = {
    "lora_A.weight": "down", "lora_B.weight": "up", "lora_down.weight": "down", "lora_up.weight": "up",
    "down.weight": "down", "up.weight": "up", "alpha": "alpha",
}
_KEY = re.compile(r"(.+?)\.(" + "|".join(re.escape(r) for r in _ROLES) + ")")

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
    """Where a file's module lands in our model: rows [offset, offset + length) of Linear `module`."""

    module: str
    offset: int = 0
    length: int | None = None  # None: all rows from offset (checked against B)
    swap: bool = False  # B's two row halves swapped (Diffusers' (scale, shift) adaLN)


@dataclass
class Piece:
    target: Target
    down: Tensor  # A: (r, in)
    up: Tensor  # B: (length, r)
    scale: float  # alpha / rank from the file
    source: str  # the file's module name, for messages


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


def diffusers_targets(model: nn.Module, keymap: KeyMap) -> dict[str, Target]:
    """{Diffusers Linear path: Target} for every Linear of `model` that `keymap` names.

    Parts of a fused tensor are `in_features` rows each (q, k, v), the last one taking the rest
    (FLUX's `proj_mlp` in `linear1`).
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    n = _index_bound(linears)
    rules = [(p, r, None) for p, r in keymap.renames] + list(keymap.fused)
    out: dict[str, Target] = {}
    for pat, rep, part in rules:
        for key in _examples(pat, n):
            ours = re.sub(pat, rep, key)
            mod = ours.removesuffix(".weight")
            if not key.endswith(".weight") or mod not in linears:
                continue  # biases, norms, position tables
            m = linears[mod]
            swap = any(re.fullmatch(s, ours) for s in keymap.swap)
            offset = 0 if part is None else part * m.in_features
            out[key.removesuffix(".weight")] = Target(mod, offset, None if part is None else m.in_features, swap)
    # the last part of a fused Linear takes the remaining rows
    by_module: dict[str, list[Target]] = {}
    for t in out.values():
        by_module.setdefault(t.module, []).append(t)
    for mod, ts in by_module.items():
        ts.sort(key=lambda t: t.offset)
        ts[-1].length = linears[mod].out_features - ts[-1].offset
    return out


# ---- format detection and key parsing ----


def detect_format(keys: list[str]) -> str:
    """`diffusers` | `kohya` | `comfyui` | `xlabs`; refused formats raise with the reason."""
    def has(pred):
        return next((k for k in keys if pred(k)), None)

    if k := has(lambda k: k.endswith(("lora_B.bias", "query_norm.scale"))):
        raise CheckpointError(f"BFL control LoRAs (with LoRA biases and replaced norms, e.g. {k!r}) are not supported")
    if k := has(lambda k: "dora_scale" in k or "lora_magnitude_vector" in k):
        raise CheckpointError(f"DoRA LoRAs are not supported (key {k!r})")
    if k := has(lambda k: k.endswith((".diff", ".diff_b"))):
        raise CheckpointError(f"full-weight differences ({k!r}) are not supported, only low-rank LoRA pairs")
    if k := has(lambda k: k.startswith(("lora_", "lycoris_")) and not k.startswith(("lora_unet_", "lora_te"))):
        raise CheckpointError(f"unsupported LoRA key naming {k!r} (OneTrainer / LyCORIS)")
    if has(lambda k: ".processor." in k):
        return "xlabs"
    if has(lambda k: k.startswith("lora_unet_")):
        return "kohya"
    if has(lambda k: k.startswith("transformer.")):
        return "diffusers"
    if k := has(lambda k: k.startswith("base_model.")):
        raise CheckpointError(f"unsupported LoRA layout (PEFT `base_model.model.` keys, e.g. {k!r})")
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


def lora_config(metadata: dict[str, str], prefix: str = "transformer") -> dict:
    """The PEFT LoraConfig kwargs Diffusers writes under `lora_adapter_metadata` (our prefix only)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    cfg = json.loads(raw)
    return {k[len(prefix) + 1 :]: v for k, v in cfg.items() if k.startswith(prefix + ".")}


def pattern_value(patterns: dict, module: str, default):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: a key matches a module path ending in it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def strip_prefix(fmt: str, key: str) -> str | None:
    """The key without its format's prefix; None for keys of other components (text encoders)."""
    if key.startswith(TEXT_ENCODER_PREFIXES):
        return None
    prefixes = {"diffusers": ("transformer.",), "kohya": ("lora_unet_",)}.get(fmt, TRANSFORMER_PREFIXES)
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
    return {n: Target(n) for n in linears}


def read_pieces(
    tensors: dict[str, Tensor], metadata: dict[str, str], model: nn.Module, keymap: KeyMap, source: str
) -> tuple[list[Piece], list[str], list[str]]:
    """All pieces of a LoRA file for `model`; also the keys that match nothing and the text-encoder keys."""
    fmt = detect_format(list(tensors))
    stripped, skipped = {}, []  # {key without prefix: file key}, text-encoder keys
    for k in tensors:
        s = strip_prefix(fmt, k)
        if s is None:
            skipped.append(k)
        else:
            stripped[s] = k
    cfg = lora_config(metadata) if fmt == "diffusers" else {}
    pieces, unmatched = module_pieces(tensors, stripped, model_targets(fmt, model, keymap), cfg, source)
    return pieces, unmatched, skipped


def module_pieces(
    tensors: dict[str, Tensor], stripped: dict[str, str], targets: dict[str, Target], cfg: dict, source: str
) -> tuple[list[Piece], list[str]]:
    """The pieces of the LoRA modules in `stripped` ({key without its prefix: file key}) that land on
    `targets`, scaled by their `.alpha` keys, else the PEFT config `cfg`; also the keys that match nothing."""
    if cfg.get("use_dora"):
        raise CheckpointError(f"{source}: DoRA LoRAs are not supported")
    modules, other = group_keys(list(stripped))
    unmatched = [stripped[k] for k in other]
    pieces = []
    for name, roles in modules.items():
        roles = {r: stripped[k] for r, k in roles.items()}
        if "down" not in roles or "up" not in roles:
            missing = "up" if "down" in roles else "down"
            raise CheckpointError(f"{source}: LoRA module {name!r} lacks its {missing} matrix")
        if name not in targets:
            unmatched += roles.values()
            continue
        down, up = tensors[roles["down"]], tensors[roles["up"]]
        rank = down.shape[0]
        if "alpha" in roles:
            alpha = float(tensors[roles["alpha"]].float().item()) or rank  # kohya: alpha 0 means rank
        else:
            alpha = pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", rank))
        scale = alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
        pieces.append(Piece(targets[name], down, up, scale, roles["down"]))
    return pieces, unmatched


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


def text_encoder_pieces(
    tensors: dict[str, Tensor], metadata: dict[str, str], encoder: nn.Module, role: str, family: str, source: str
) -> tuple[list[Piece], list[str]]:
    """All pieces of a LoRA file for our text encoder `role` of a `family` pipeline; also its keys that
    match no Linear of the encoder. Keys of the other parts are ignored."""
    detect_format(list(tensors))  # refuses DoRA, full-weight differences, ...
    pieces, unmatched = [], []
    for prefix, (r, fmt) in text_encoder_prefixes(family).items():
        stripped = {k[len(prefix):]: k for k in tensors if k.startswith(prefix)}
        if r != role or not stripped:
            continue
        cfg = lora_config(metadata, prefix[:-1]) if fmt == "diffusers" else {}
        p, u = module_pieces(tensors, stripped, encoder_targets(encoder, fmt), cfg, source)
        pieces, unmatched = pieces + p, unmatched + u
    return pieces, unmatched
