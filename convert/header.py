"""The safetensors header, read and validated: every refusal names the file and the key.

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the tensors'
bytes (safetensors `README.md`, "Format"). The JSON maps each key to `{"dtype", "shape", "data_offsets":
[begin, end]}` (byte offsets after the header) and may hold `__metadata__`, a map of strings. We check
what the safetensors library checks when it opens a file (its `Metadata::validate`): each entry is an
object with those three fields of the right types, a known dtype, `end - begin` equal to the shape's
size, and the byte ranges packed back to back from 0 to the end of the file (no overlap, no gap, no
trailing bytes), so no two keys share bytes and no offset points into the header. The library itself
then opens the file once (`safe_open`) as a backstop, at a cost of milliseconds.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError
from .quant import refuse

# safetensors dtype names -> torch dtypes (the ones our loaders read)
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 << 20  # the library's limit (100 MB)
GGUF_MAGIC = b"GGUF"  # ggml `docs/gguf.md`: a GGUF file starts with these 4 bytes
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")  # torch.save files: a zip (PK..) or a pickle (0x80, protocol >= 2)


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: a key written twice is an error (which of the two would be read?)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def read_header(path: str | os.PathLike) -> dict:
    """The validated JSON header of a safetensors file, with `__data_start__` (the data's byte offset) added.

    Errors (CheckpointError, naming the file and the key): not a file; not safetensors (pickled
    `.ckpt`/`.pt`/`.bin`, GGUF: UnsupportedQuantization); a malformed entry, dtype or byte range.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] == GGUF_MAGIC:
            raise refuse(str(path), "GGUF (llama.cpp / ComfyUI-GGUF)", "a GGUF file, not safetensors")
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > min(size - 8, MAX_HEADER):
            pickled = head[:1] == b"\x80" or head[:4] == b"PK\x03\x04" or path.suffix in PICKLE_SUFFIXES
            raise CheckpointError(
                f"{path}: not a safetensors file "
                + ("(pickled .ckpt/.pt/.bin files are not read: convert them to safetensors first)" if pickled
                   else "(no safetensors header: a weights file this project loads is .safetensors)")
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise CheckpointError(f"{path}: not a valid safetensors file: key {e.args[0]!r} appears twice in the header")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    _validate(header, size - 8 - n, path)
    try:  # the library's own checks, as a backstop to ours
        with safe_open(path, "pt"):
            pass
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file (the safetensors library says: {e})") from None
    header["__data_start__"] = 8 + n
    return header


def _validate(header: dict, data_size: int, path: Path) -> None:
    """The checks of the module docstring; `data_size`: the bytes after the header."""
    bad = f"{path}: not a valid safetensors file:"
    metadata = header.get("__metadata__")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointError(f"{bad} its __metadata__ is not a map of strings")
    ranges = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise CheckpointError(f"{bad} the entry of key {key!r} is not a JSON object")
        missing = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
        if missing:
            raise CheckpointError(f"{bad} key {key!r} has no {', '.join(missing)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(
                f"{path}: key {key!r} has dtype {dtype!r}, which this project does not read "
                f"(it reads {', '.join(DTYPES)})"
            )
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{bad} key {key!r} has shape {shape!r}, not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise CheckpointError(f"{bad} key {key!r} has data_offsets {offsets!r}, not two non-negative integers")
        begin, end = offsets
        need = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != need:
            raise CheckpointError(
                f"{bad} key {key!r} has data_offsets {offsets} ({end - begin} bytes), but its shape {shape} "
                f"of {dtype} takes {need} bytes"
            )
        ranges.append((begin, end, key))
    at, previous = 0, None
    for begin, end, key in sorted(ranges):
        if begin < at:
            raise CheckpointError(f"{bad} keys {previous!r} and {key!r} share bytes [{begin}, {min(at, end)})")
        if begin > at:
            raise CheckpointError(f"{bad} bytes [{at}, {begin}) before key {key!r} belong to no tensor")
        at, previous = end, key
    if at > data_size:
        raise CheckpointError(
            f"{path}: truncated file: key {previous!r} ends at data byte {at}, the file holds {data_size}"
        )
    if at < data_size:
        raise CheckpointError(f"{bad} its last {data_size - at} bytes belong to no tensor")


def _is_count(x) -> bool:
    return type(x) is int and x >= 0
