"""Reading and writing safetensors and JSON configs, with the checks every loader shares.

`Checkpoint` is a lazy, read-only view of one safetensors file, or of the shards of a sharded
checkpoint: it knows every key's shape and dtype from the headers (validated: convert/header.py) and
reads one tensor at a time (memory-mapped), so materializing a model needs about one copy of the
weights. Nothing is ever unpickled: a file that is not safetensors is refused with a clear error.
`read_config` reads JSON configs as `Config`s, whose typed reads name the file and field.
`write_atomic` is the one way this repository writes a file: whole or not at all.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from .errors import CheckpointError, UnsupportedQuantization  # noqa: F401 (re-exported: their home is errors.py)
from .header import DTYPES, read_header  # noqa: F401 (read_header re-exported)
from .quant import detect

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOAT8_LOADS_AS = torch.bfloat16  # float8 weights are upcast at load unless a dtype is asked (docs/formats.md)

# Where single files keep each part of a pipeline (SAI and ComfyUI files; Diffusers
# `loaders/single_file_utils.py` `CHECKPOINT_KEY_NAMES`, `LDM_VAE_KEYS`; ComfyUI `comfy/supported_models.py`).
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
AUTOENCODER_PREFIXES = ("first_stage_model.", "vae.")
BUNDLED_ENCODERS = {  # our encoder role -> its prefix in SAI `*_incl_clips*` and ComfyUI all-in-one files
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5": "text_encoders.t5xxl.transformer.",
}
# Parts of single files that never hold the transformer (older SD files: `cond_stage_model.`, `conditioner.`).
NOT_TRANSFORMER = (*AUTOENCODER_PREFIXES, "text_encoders.", "cond_stage_model.", "conditioner.")


class Config(dict):
    """A JSON object read from a file (`read_config`): a dict whose typed reads name the file and the field.

    `get_int("num_layers", 19)`: the field, or the default when it is absent or null; a value of the wrong
    type is a CheckpointError naming the file and the field. `source`: the file (or what holds the JSON).
    """

    def __init__(self, data: Mapping, source: str):
        super().__init__(data)
        self.source = source

    def _typed(self, name: str, default, expected: str, ok: Callable[[object], bool]):
        value = self.get(name)
        if value is None:
            return default
        if not ok(value):
            raise CheckpointError(f"{self.source}: field {name!r} is {value!r}, expected {expected}")
        return value

    def get_int(self, name: str, default: int | None = None, minimum: int | None = 1) -> int | None:
        """An integer field (at least `minimum`, default 1: sizes and counts)."""
        low = -math.inf if minimum is None else minimum
        expected = "an integer" + ("" if minimum is None else f" >= {minimum}")
        return self._typed(name, default, expected, lambda v: type(v) is int and v >= low)

    def get_float(self, name: str, default: float | None = None) -> float | None:
        """A finite number (an integer is accepted)."""
        v = self._typed(name, default, "a number", lambda v: type(v) in (int, float) and math.isfinite(v))
        return None if v is None else float(v)

    def get_bool(self, name: str, default: bool | None = None) -> bool | None:
        return self._typed(name, default, "true or false", lambda v: type(v) is bool)

    def get_str(self, name: str, default: str | None = None) -> str | None:
        return self._typed(name, default, "a string", lambda v: isinstance(v, str))

    def get_ints(self, name: str, default: tuple | None = None, minimum: int = 0) -> tuple[int, ...] | None:
        """A list of integers (at least `minimum` each), as a tuple."""
        ok = lambda v: isinstance(v, (list, tuple)) and all(type(x) is int and x >= minimum for x in v)  # noqa: E731
        v = self._typed(name, default, f"a list of integers >= {minimum}", ok)
        return None if v is None else tuple(v)

    def get_dict(self, name: str) -> Config:
        """A nested JSON object ({} when absent), itself a Config naming the field in its errors."""
        value = self._typed(name, {}, "a JSON object", lambda v: isinstance(v, dict))
        return Config(value, f"{self.source}, field {name!r}")

    @classmethod
    def of(cls, data: Mapping | None, source: str = "config") -> Config:
        """`data` as a Config (a plain dict gets `source` as its name); None stays None."""
        return data if isinstance(data, Config) or data is None else cls(data, source)


def read_config(path: str | os.PathLike) -> Config | None:
    """A JSON config file (config.json, an index, a tokenizer config, model_index.json); None if there is no such file.

    Errors name the file: malformed JSON, or JSON that is not an object; `Config`'s typed reads name the field.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return Config(config, str(path))


def parse_json(text: str, where: str) -> Config:
    """A JSON object stored as a string (e.g. a header entry), as a Config; errors name `where`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    return Config(value, where)


class Shapes(dict):
    """{key: shape} of the tensors a config is read from; errors say what lacks a key or a block."""

    def __init__(self, shapes: Mapping[str, list[int]], what: str):
        super().__init__(shapes)
        self.what = what  # e.g. "SD3 checkpoint", a file name

    def __missing__(self, key: str):
        raise CheckpointError(f"{self.what} lacks key {key!r}")

    def block_indices(self, pattern: str) -> set[int]:
        """The indices `pattern` (its one group: the index) finds at the start of the keys."""
        return {int(m[1]) for k in self if (m := re.match(pattern, k))}

    def count_blocks(self, pattern: str) -> int:
        r"""How many blocks `pattern` (e.g. `double_blocks\.(\d+)\.`) finds; their indices must be 0..n-1."""
        idx = self.block_indices(pattern)
        if idx != set(range(len(idx))):
            raise CheckpointError(f"{self.what}: block indices are not contiguous: {sorted(idx)} ({pattern})")
        return len(idx)


class Entry(NamedTuple):
    """Where one tensor lies: its file, the absolute byte offset of its data, its shape and stored dtype."""

    file: Path
    offset: int
    shape: list[int]
    dtype: torch.dtype


class Checkpoint(Mapping):
    """Lazy view of safetensors files: `ckpt[key]` reads one tensor; `shape(key)`, `dtype(key)` read nothing.

    Opening a file validates its header (convert/header.py) and finds its quantization before anything
    else (convert/quant.py): formats we do not read are refused there, naming the format. Scaled fp8
    files (ComfyUI's) are dequantized transparently: their markers and scales are not keys of the view,
    and loading `<layer>.weight` gives `W_fp8 * scale` (docs/formats.md, "Quantized files").
    `source` names the file (or the index or folder of a sharded checkpoint) in every error.
    """

    def __init__(self, files: Iterable[str | os.PathLike], _entries: dict | None = None, metadata=None,
                 _scales=None, source: str | None = None, quantization: str | None = None):
        self.files = [Path(f) for f in files]
        self.source = source or (str(self.files[0]) if len(self.files) == 1 else "checkpoint")
        self.metadata: dict[str, str] = dict(metadata or {})
        self._scales: dict[str, Entry] = _scales or {}  # weight key -> its one-number scale
        self.quantization = quantization  # the format's name (convert/quant.py), None: plain or float8-cast
        if _entries is not None:
            self._entries: dict[str, Entry] = _entries
            return
        self._entries = {}
        for f in self.files:
            header = read_header(f)
            start = header.pop("__data_start__")
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, info in header.items():
                if name in self._entries:
                    raise CheckpointError(f"{f}: key {name!r} also appears in {self._entries[name].file}")
                begin = info["data_offsets"][0]
                self._entries[name] = Entry(f, start + begin, list(info["shape"]), DTYPES[info["dtype"]])
        found = detect(
            {k: e.shape for k, e in self._entries.items()}, {k: e.dtype for k, e in self._entries.items()},
            self.metadata, lambda k: _read(self._entries[k], None, "cpu"), self.source,
        )
        self.quantization = found.name
        self._scales = {w: self._entries[s] for w, s in found.scales.items()}
        for k in found.extra:
            del self._entries[k]

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
                return cls(files, source=str(path))
        if path.name.endswith(".index.json"):
            index = read_config(path)
            if index is None:
                raise CheckpointError(f"{path}: no such file")
            weight_map = index.get_dict("weight_map")
            if not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{path}: field 'weight_map' must map keys to file names")
            shards = sorted(set(weight_map.values()))
            if not shards:
                raise CheckpointError(f"{path}: index has no weight_map")
            missing = [s for s in shards if not (path.parent / s).is_file()]
            if missing:
                raise CheckpointError(f"{path}: shard file(s) missing: {', '.join(missing)}")
            metadata = index.get_dict("metadata")
            return cls([path.parent / s for s in shards], metadata={k: str(v) for k, v in metadata.items()},
                       source=str(path))
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
        return self._entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key].dtype

    def shapes(self, what: str | None = None) -> Shapes:
        """{key: shape} of every tensor (nothing is read); a missing key is an error naming `what` (the file)."""
        return Shapes({k: e.shape for k, e in self._entries.items()}, what or self.source)

    def load(self, key: str, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        """One tensor, cast (float8 is upcast) and moved; nothing else of the file is held.

        Stored as wanted: a zero-copy view of a private (copy-on-write) map of just this tensor, so
        loading costs no copy and edits (a LoRA merge) never reach the file. To be cast: read into a
        buffer of its own, cast, and the buffer is freed, so no mapped pages pile up.
        """
        if key in self._scales:  # scaled fp8: W = W_fp8 * scale, computed in fp32
            w = _read(self._entries[key], torch.float32, "cpu") * _read(self._scales[key], torch.float32, "cpu")
            return w.to(device=device, dtype=dtype or FLOAT8_LOADS_AS)
        return _read(self._entries[key], dtype, device)

    def loaders(self, dtype: torch.dtype | None = None, device="cpu") -> dict[str, Callable[[], torch.Tensor]]:
        """{key: a zero-argument `load` of it} for every tensor: lazy input for `load_state_dict_strict`."""
        return {k: partial(self.load, k, dtype, device) for k in self._entries}

    def _view(self, entries: dict, scales: dict, source: str) -> Checkpoint:
        return Checkpoint(self.files, _entries=entries, metadata=self.metadata, _scales=scales, source=source,
                          quantization=self.quantization)

    def with_prefix(self, prefix: str) -> Checkpoint:
        """The keys under `prefix`, with the prefix removed (a view, nothing is read)."""
        entries = {k[len(prefix):]: v for k, v in self._entries.items() if k.startswith(prefix)}
        scales = {k[len(prefix):]: v for k, v in self._scales.items() if k.startswith(prefix)}
        return self._view(entries, scales, self.source)

    def without_prefixes(self, prefixes: Iterable[str]) -> Checkpoint:
        """All keys except those under any of `prefixes` (e.g. bundled encoders)."""
        prefixes = tuple(prefixes)
        entries = {k: v for k, v in self._entries.items() if not k.startswith(prefixes)}
        return self._view(entries, self._scales, self.source)

    def part(self, prefixes: Iterable[str]) -> Checkpoint | None:
        """The keys under the first of `prefixes` that some key has, prefix removed; None if no key has any."""
        prefix = next((p for p in prefixes if any(k.startswith(p) for k in self._entries)), None)
        return None if prefix is None else self.with_prefix(prefix)

    def storage_dtype(self) -> torch.dtype:
        """The most common floating dtype among the tensors (what the file 'is')."""
        counts: dict[torch.dtype, int] = {}
        for e in self._entries.values():
            if e.dtype.is_floating_point:
                counts[e.dtype] = counts.get(e.dtype, 0) + math.prod(e.shape)
        return max(counts, key=counts.get) if counts else torch.float32

    def load_dtype(self) -> torch.dtype:
        """The dtype loaders default to: the storage dtype, float8 upcast to bfloat16."""
        dtype = self.storage_dtype()
        return FLOAT8_LOADS_AS if dtype in FLOAT8 else dtype

    def describe_storage(self) -> str:
        """The stored dtype and the quantization, for messages and `python -m convert inspect`."""
        dtype = str(self.storage_dtype()).removeprefix("torch.")
        if self.quantization:
            return f"{dtype} ({self.quantization}, dequantized at load)"
        return f"{dtype} (plain cast at load)" if self.storage_dtype() in FLOAT8 else dtype


def _read(entry: Entry, dtype: torch.dtype | None, device) -> torch.Tensor:
    """Read one tensor: see `Checkpoint.load`."""
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
    """`module.load_state_dict(tensors, strict=True, assign=True)`, with errors that name keys, shapes and dtypes.

    `tensors` may hold real tensors or zero-argument callables producing them (read lazily, in order),
    so only one source tensor is in flight at a time. Nothing is assigned unless every key and shape fits.
    A tensor that is not floating point where the module has floating-point weights (an integer or bool
    tensor, e.g. a quantized weight) is refused by name.
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
        if ref.dtype.is_floating_point and not t.dtype.is_floating_point:
            raise CheckpointError(
                f"{source}: key {k!r} is stored as {str(t.dtype).removeprefix('torch.')}, the {what} expects "
                "floating-point weights (a quantized file?)"
            )
        out[k] = t
    module.load_state_dict(out, strict=True, assign=True)


def check_can_create(folder: Path, what: str | os.PathLike) -> None:
    """Raise OSError `"{what}: cannot write a file in {folder}: ..."` unless a new file can be created in
    `folder` (tried with an empty hidden file, removed at once: permissions, read-only or full file systems)."""
    probe = Path(folder) / f".taca-mmdit.{os.urandom(6).hex()}.check"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise type(e)(f"{what}: cannot write a file in {folder}: {e.strerror}") from None
    probe.unlink()


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp)` on a temporary file beside `path`, then rename it to `path`: never a half-written file.

    What is left is what a plain `open(path, "w")` would leave, but whole or not at all:
    - the folder is created if needed (a part of it that is not a folder: NotADirectoryError naming it);
    - a new file gets `open`'s mode, 0o666 less the umask (the temporary file is created with mode
      0o666, and the kernel applies the umask and any default ACL, as for `open`);
    - a file it replaces keeps its permission bits, as `open` keeps the inode's (the owner becomes the
      writer: only root could keep another's); a file `open` could not write is a PermissionError;
    - a symbolic link is followed: the file it points to is replaced, the link stays;
    - a path that exists and is not a regular file (a FIFO, `/dev/stdout`, a device) is written
      through in place, as `open` would (not atomically: there is nothing to rename); a folder is an
      IsADirectoryError.
    If `write` fails, the temporary file is removed and `path` is left as it was. OS errors name `path`,
    never the temporary file. `write` must write to the name it is given (not infer a format from its suffix).
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # exists/is_file follow links
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a folder, not a file")
        write(str(path))
        return
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise NotADirectoryError(f"{path}: {blocker} is not a folder") from None
    kept = None  # the permission bits of the file replaced
    if path.exists():
        kept = path.stat().st_mode & 0o777
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path}: not writable (mode {kept:o}), as open() would refuse; not replaced")
    tmp = folder / f".{path.name}.{os.urandom(6).hex()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror} (cannot create a file in {folder})", str(path)) from None
    created = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        write(str(tmp))
        os.chmod(tmp, created if kept is None else kept)  # also right if `write` made the file anew
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, str(tmp)):
            raise OSError(e.errno, e.strerror, str(path)) from e  # name the file, not the temporary one
        raise


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """Save `tensors` (moved to the CPU, made contiguous) with string `metadata`, through `write_atomic`."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()}))
