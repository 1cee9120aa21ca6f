"""Reading and writing safetensors, with the checks every loader shares.

`Checkpoint` is a lazy, read-only view of one safetensors file, or of the shards of a sharded
checkpoint: it knows every key's shape and dtype from the headers and reads one tensor at a time
(safetensors memory-maps the file), so materializing a model needs about one copy of the weights.
Nothing is ever unpickled: a file that is not safetensors is refused with a clear error.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

# safetensors dtype names -> torch dtypes
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: the message names the file, key or shape."""


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, with `__data_start__` added; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > min(size - 8, 100 << 20):
            raise CheckpointError(
                f"{path}: not a safetensors file (pickled .ckpt/.pt/.bin files are not read: "
                "convert them to safetensors first)"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    header["__data_start__"] = 8 + n
    return header


class Checkpoint(Mapping):
    """Lazy view of safetensors files: `ckpt[key]` reads one tensor; `shape(key)`, `dtype(key)` read nothing.

    ComfyUI "scaled fp8" files are dequantized transparently: their `scaled_fp8` marker and the
    `<layer>.scale_weight` / `.scale_input` tensors are not keys of the view, and loading
    `<layer>.weight` gives `W_fp8 * scale_weight` (FORMATS.md 1.6).
    """

    def __init__(self, files: Iterable[str | os.PathLike], _entries: dict | None = None, metadata=None, _scales=None):
        self.files = [Path(f) for f in files]
        self.metadata: dict[str, str] = dict(metadata or {})
        self._scales: dict[str, tuple] = _scales or {}  # weight key -> entry of its scale_weight
        if _entries is not None:
            self._entries = _entries
            return
        # key -> (file, absolute byte offset, shape, dtype)
        self._entries: dict[str, tuple[Path, int, list[int], torch.dtype]] = {}
        for f in self.files:
            header = read_header(f)
            start = header.pop("__data_start__")
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, info in header.items():
                if name in self._entries:
                    raise CheckpointError(f"{f}: key {name!r} also appears in {self._entries[name][0]}")
                if info["dtype"] not in _DTYPES:
                    raise CheckpointError(f"{f}: key {name!r} has unsupported dtype {info['dtype']}")
                dtype, (begin, end) = _DTYPES[info["dtype"]], info["data_offsets"]
                if end - begin != math.prod(info["shape"]) * dtype.itemsize:
                    raise CheckpointError(f"{f}: key {name!r}: data size does not match shape {info['shape']}")
                self._entries[name] = (f, start + begin, list(info["shape"]), dtype)
        for k in [k for k in self._entries if k.endswith(("scaled_fp8", ".scale_weight", ".scale_input"))]:
            entry = self._entries.pop(k)
            if k.endswith(".scale_weight"):
                self._scales[k[: -len("scale_weight")] + "weight"] = entry

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        """A `.safetensors` file, a sharded `*.safetensors.index.json`, or a folder holding either."""
        path = Path(path)
        if path.is_dir():
            indexes = sorted(path.glob("*.safetensors.index.json"))
            files = sorted(path.glob("*.safetensors"))
            if indexes:
                path = indexes[0]
            elif len(files) == 1:
                path = files[0]
            elif not files:
                raise CheckpointError(f"{path}: folder holds no .safetensors file")
            else:
                return cls(files)
        if path.name.endswith(".index.json"):
            index = json.loads(path.read_text())
            shards = sorted(set(index.get("weight_map", {}).values()))
            if not shards:
                raise CheckpointError(f"{path}: index has no weight_map")
            missing = [s for s in shards if not (path.parent / s).is_file()]
            if missing:
                raise CheckpointError(f"{path}: shard file(s) missing: {', '.join(missing)}")
            return cls([path.parent / s for s in shards], metadata=index.get("metadata"))
        return cls([path])

    # Mapping interface: keys and lazy values
    def __getitem__(self, key: str) -> torch.Tensor:
        return self.load(key)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:  # Mapping's default would read the tensor
        return key in self._entries

    def shape(self, key: str) -> list[int]:
        return self._entries[key][2]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][3]

    def load(self, key: str, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        """One tensor, cast (float8 is upcast) and moved; nothing else of the file is held.

        Stored as wanted: a zero-copy view of a private (copy-on-write) map of just this tensor, so
        loading costs no copy and edits (a LoRA merge) never reach the file. To be cast: read into a
        buffer of its own, cast, and the buffer is freed, so no mapped pages pile up.
        """
        if key in self._scales:  # scaled fp8: W = W_fp8 * scale_weight, computed in fp32
            w = _read(self._entries[key], torch.float32, "cpu") * _read(self._scales[key], torch.float32, "cpu")
            return w.to(device=device, dtype=dtype or torch.bfloat16)
        return _read(self._entries[key], dtype, device)

    def with_prefix(self, prefix: str) -> Checkpoint:
        """The keys under `prefix`, with the prefix removed (a view, nothing is read)."""
        entries = {k[len(prefix):]: v for k, v in self._entries.items() if k.startswith(prefix)}
        scales = {k[len(prefix):]: v for k, v in self._scales.items() if k.startswith(prefix)}
        return Checkpoint(self.files, _entries=entries, metadata=self.metadata, _scales=scales)

    def without_prefixes(self, prefixes: Iterable[str]) -> Checkpoint:
        """All keys except those under any of `prefixes` (e.g. bundled encoders)."""
        prefixes = tuple(prefixes)
        entries = {k: v for k, v in self._entries.items() if not k.startswith(prefixes)}
        return Checkpoint(self.files, _entries=entries, metadata=self.metadata, _scales=self._scales)

    def storage_dtype(self) -> torch.dtype:
        """The most common floating dtype among the tensors (what the file 'is')."""
        counts: dict[torch.dtype, int] = {}
        for _, _, shape, dt in self._entries.values():
            if dt.is_floating_point:
                n = 1
                for s in shape:
                    n *= s
                counts[dt] = counts.get(dt, 0) + n
        return max(counts, key=counts.get) if counts else torch.float32


def _read(entry: tuple, dtype: torch.dtype | None, device) -> torch.Tensor:
    """Read one tensor entry (file, offset, shape, dtype): see `Checkpoint.load`."""
    file, offset, shape, stored = entry
    n = math.prod(shape) * stored.itemsize
    if n == 0:
        return torch.empty(shape, dtype=dtype if dtype is not None else stored, device=device)
    with open(file, "rb") as f:
        if dtype is None or dtype == stored or not stored.is_floating_point:
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            try:
                buf = mmap.mmap(f.fileno(), offset - start + n, access=mmap.ACCESS_COPY, offset=start)
            except ValueError:
                raise CheckpointError(f"{file}: truncated file (at byte {offset})") from None
            t = torch.frombuffer(buf, dtype=torch.uint8, count=n, offset=offset - start)
            return t.view(stored).reshape(shape).to(device)
        buf = bytearray(n)
        f.seek(offset)
        if f.readinto(buf) != n:
            raise CheckpointError(f"{file}: truncated file (at byte {offset})")
    return torch.frombuffer(buf, dtype=torch.uint8).view(stored).reshape(shape).to(device=device, dtype=dtype)


def load_state_dict_strict(
    module: torch.nn.Module, tensors: Mapping[str, object], what: str, source: str
) -> None:
    """`module.load_state_dict(tensors, strict=True, assign=True)`, with errors that name keys and shapes.

    `tensors` may hold real tensors or zero-argument callables producing them (read lazily, in order),
    so only one source tensor is in flight at a time. Nothing is assigned unless every key and shape fits.
    """
    expected = module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = [f"{source}: does not match the {what} it was detected as"]
        if missing:
            parts.append(f"missing {len(missing)} key(s), first: {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), first: {', '.join(unexpected[:5])}")
        raise CheckpointError("; ".join(parts))
    out = {}
    for k, ref in expected.items():
        t = tensors[k]
        t = t() if callable(t) else t
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: key {k!r} has shape {list(t.shape)}, the {what} expects {list(ref.shape)}"
            )
        out[k] = t
    module.load_state_dict(out, strict=True, assign=True)


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp)` to a temporary file beside `path`, then rename it to `path`: never a half-written file.

    The folder is created if needed; on any error the temporary file is removed and the error raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
