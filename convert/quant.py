"""Quantized files: which format a file is in, and how the formats we read are dequantized.

The format is decided from the keys, dtypes and header alone, before any loader reasons about shapes
(a packed 4-bit weight's shape is not the model's). Read, each weight dequantized at load in float32
(docs/formats.md, "Quantized files"):

| format | what the file holds | weight |
|---|---|---|
| float8 cast | `F8_E4M3` / `F8_E5M2` weights, no scale | `W = W_fp8` |
| ComfyUI scaled fp8 | a `scaled_fp8` marker, `<layer>.scale_weight` (one number), `<layer>.scale_input` | `W = W_fp8 * scale_weight` |
| ComfyUI mixed precision, fp8 layers | `<layer>.comfy_quant` (JSON bytes, `{"format": "float8_e4m3fn"}`) or the header's `_quantization_metadata`, `<layer>.weight_scale` (one number), `<layer>.input_scale` | `W = W_fp8 * weight_scale` |

The last two are ComfyUI `comfy/utils.py` `convert_old_quants` (which rewrites the first into the second),
`comfy/ops.py` `mixed_precision_ops` and `comfy/quant_ops.py` `TensorCoreFP8Layout.dequantize`.
Every other quantization is refused with its name: `REFUSED` lists the key each one writes; GGUF files
are not safetensors at all (convert/header.py recognizes their magic bytes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .errors import CheckpointError, UnsupportedQuantization

SUPPORTED = (
    "bf16/fp16/fp32 weights, float8_e4m3fn/e5m2 casts, and ComfyUI scaled fp8 "
    "(`scaled_fp8` + `scale_weight`, or `comfy_quant` float8 + `weight_scale`)"
)
FLOAT8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}  # ComfyUI's names

# Refused formats, by a key suffix only that format writes (first match wins)
REFUSED = [
    ("bitsandbytes NF4", (".quant_state.bitsandbytes__nf4",)),  # bitsandbytes `functional.py` `QuantState.as_dict`
    ("bitsandbytes FP4", (".quant_state.bitsandbytes__fp4",)),
    ("bitsandbytes 4-bit", (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")),
    ("bitsandbytes int8 (LLM.int8)", (".SCB", ".weight_format")),  # bitsandbytes `nn/modules.py` `Linear8bitLt`
    ("optimum-quanto", (".weight._data", ".weight._scale")),  # optimum-quanto `nn/qmodule.py`
    ("torchao", ("._weight_qdata",)),  # torchao `prototype/safetensors/safetensors_support.py`
    ("GPTQ/AWQ-style packed int4", (".qweight", ".qzeros")),
    ("block-scaled fp8 (`weight_scale_inv`)", (".weight_scale_inv",)),
]


@dataclass
class Quantization:
    """What `detect` found: the format's name (None: plain or float8-cast weights), the one-number scale
    of each scaled weight ({weight key: scale key}), and the keys that are not weights (markers, scales)."""

    name: str | None = None
    scales: dict[str, str] = field(default_factory=dict)
    extra: set[str] = field(default_factory=set)


def refuse(source: str, name: str, found: str) -> UnsupportedQuantization:
    """The error for a file quantized with `name` (found: what gave it away)."""
    return UnsupportedQuantization(
        f"{source}: quantized with {name} ({found}), which this project does not read: it reads {SUPPORTED}; "
        "use a bf16/fp16 or fp8 file of the same model", name
    )


def detect(
    shapes: Mapping[str, list[int]], dtypes: Mapping[str, torch.dtype], metadata: Mapping[str, str],
    read: Callable[[str], torch.Tensor], source: str,
) -> Quantization:
    """The quantization of a file from its keys' shapes and dtypes and its header; `read(key)` reads one small
    tensor (a `comfy_quant` marker). Refused formats raise `UnsupportedQuantization` naming the format."""
    for name, suffixes in REFUSED:
        if k := next((k for k in shapes if k.endswith(suffixes)), None):
            raise refuse(source, name, f"key {k!r}")
    if "tensor_names" in metadata:  # torchao's flattened tensor subclasses list their names there
        raise refuse(source, "torchao", "header entry 'tensor_names'")
    layers = _comfy_layers(shapes, metadata, read, source)
    if layers:
        return _mixed_precision(layers, shapes, dtypes, source)
    scale_weights = [k for k in shapes if k.endswith(".scale_weight")]
    if scale_weights:
        scales = {_weight_of(k, "scale_weight", shapes, source): k for k in scale_weights}
        extra = {k for k in shapes if k.endswith(("scaled_fp8", ".scale_input"))} | set(scale_weights)
        return Quantization("ComfyUI scaled fp8", scales, extra)
    if k := next((k for k in shapes if k.endswith(".weight_scale")), None):
        raise refuse(source, "an fp8 `weight_scale` without a `comfy_quant` format marker",
                     f"key {k!r}: its convention is not declared in the file")
    return Quantization(extra={k for k in shapes if k.endswith("scaled_fp8")})


def _weight_of(scale_key: str, suffix: str, shapes: Mapping[str, list[int]], source: str) -> str:
    """The weight a one-number scale `<layer>.<suffix>` belongs to; errors name the key."""
    weight = scale_key[: -len(suffix)] + "weight"
    if weight not in shapes:
        raise CheckpointError(f"{source}: key {scale_key!r} scales {weight!r}, which the file lacks")
    if math.prod(shapes[scale_key]) != 1:
        raise CheckpointError(
            f"{source}: key {scale_key!r} has shape {shapes[scale_key]}: only one scale per weight is read "
            "(ComfyUI's fp8 layout); per-row or block scales are not supported"
        )
    return weight


def _comfy_layers(
    shapes: Mapping[str, list[int]], metadata: Mapping[str, str], read: Callable[[str], torch.Tensor], source: str
) -> dict[str, str]:
    """{layer: format} from the `<layer>.comfy_quant` markers and the header's `_quantization_metadata`."""
    layers: dict[str, str] = {}
    raw = metadata.get("_quantization_metadata")
    if raw is not None:
        where = f"{source}: header entry '_quantization_metadata'"
        try:
            table = json.loads(raw).get("layers")
        except (json.JSONDecodeError, AttributeError):
            table = None
        if not isinstance(table, dict):
            raise CheckpointError(f"{where} is not a JSON object with a 'layers' object")
        layers |= {layer: _format(conf, f"{where}, layer {layer!r}") for layer, conf in table.items()}
    for k in shapes:
        if k.endswith(".comfy_quant"):
            marker = read(k)
            try:
                conf = json.loads(bytes(marker.tolist()).decode("utf-8")) if marker.dtype == torch.uint8 else None
            except (ValueError, UnicodeDecodeError):
                conf = None
            layers[k.removesuffix(".comfy_quant")] = _format(conf, f"{source}: key {k!r}")
    return layers


def _format(conf, where: str) -> str:
    if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
        raise CheckpointError(f"{where}: expected a JSON object with a string 'format' (ComfyUI `comfy/ops.py`)")
    return conf["format"]


def _mixed_precision(layers: dict[str, str], shapes, dtypes, source: str) -> Quantization:
    """ComfyUI mixed precision: fp8 layers with one `weight_scale` each; any other layer format is refused."""
    scales, extra = {}, set()
    for layer, fmt in layers.items():
        if fmt not in FLOAT8_FORMATS:
            raise refuse(source, f"ComfyUI mixed precision {fmt!r}", f"layer {layer!r}")
        scale = f"{layer}.weight_scale"
        if scale not in shapes:
            raise CheckpointError(f"{source}: layer {layer!r} is marked {fmt!r} but has no {scale!r}")
        weight = _weight_of(scale, "weight_scale", shapes, source)
        if dtypes[weight] != FLOAT8_FORMATS[fmt]:
            raise CheckpointError(f"{source}: layer {layer!r} is marked {fmt!r} but {weight!r} is {dtypes[weight]}")
        scales[weight] = scale
        extra |= {k for k in (scale, f"{layer}.comfy_quant", f"{layer}.input_scale") if k in shapes}
    stray = next((k for k in shapes if k.endswith(".weight_scale") and k not in extra), None)
    if stray:
        raise CheckpointError(f"{source}: key {stray!r} has no format marker for its layer (`comfy_quant`)")
    return Quantization(f"ComfyUI mixed precision ({', '.join(sorted(set(layers.values())))})", scales, extra)
