"""Training data: image-caption pairs, cached once as latents and text embeddings, served in seeded batches.

Sources: a folder of images with same-name `.txt` captions (searched recursively), or a JSONL manifest
whose lines are `{"image": path, "caption": text}` (paths relative to the manifest). A caption file
that cannot be read as UTF-8 text is skipped with its image, with a warning naming it. Each image is
turned upright (EXIF), made RGB in [-1, 1] (`open_image`: 16-bit and float greyscale scaled from
their own range, transparency composited over white), resized to cover the target size and
center-cropped: a `resolution` square, or with `buckets` the aspect-ratio bucket of about
`resolution**2` pixels closest to the image's. Images smaller than that are enlarged, with a warning.
With `native` each image keeps its own size, center-cropped to sides that are multiples of 16: a dataset
drawn at several sizes trains at each of them (multi-resolution training; batches of one size).

A first pass encodes every image with the autoencoder and every caption with the text encoders and
writes one safetensors file per pair (`latent`, `context`, `pooled` if any) under the cache folder, named by
a hash of the image file (path, size, mtime), the caption, the size settings and the encoders' tag:
a later run (or a resumed one) finds them and does not load the encoders at all. Unreadable images
are skipped with a warning naming them, and counted; a marker file remembers them (until the file
changes). With several processes each encodes its share. A cache file that cannot be written (a full
disk) stops the run with a `WriteError` naming it (training/disk.py).

Batches: `BatchSampler` is a pure function of (seed, step): per epoch, each bucket's members are
shuffled and cut into global batches (the last one topped up from the bucket's start), and the
batches shuffled. So a resumed run, or a run on any number of processes, sees the same samples.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torch import Tensor

from convert.files import read_header, save_safetensors_atomic

from . import distributed as dist
from .disk import writing

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ENCODE_BATCH = 8  # images (and captions) encoded at once in the caching pass
# greyscale modes of more than 8 bits -> the value of white: Pillow opens 16-bit PNGs as "I;16" (older
# versions: "I"), TIFFs as "I;16*", "I" or "F" (floats, taken as [0, 1])
WHITE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str


@dataclass
class Encoders:
    """What the caching pass needs from a pipeline: captions -> (context (B, L, D), pooled (B, P) or None),
    images (B, 3, H, W) in [-1, 1] -> latents (B, z, H/8, W/8) as the transformer sees them (z = 16; FLUX.2:
    32, batch-norm normalized)."""

    encode_prompts: Callable[[list[str]], tuple[Tensor, Tensor | None]]
    encode_images: Callable[[Tensor], Tensor]


def encoders_from_pipeline(pipe) -> Encoders:
    """The text encoders and autoencoder of a `sampling.Pipeline`."""
    ae = pipe.autoencoder

    def encode_images(images: Tensor) -> Tensor:  # as the transformer sees them (FLUX.2: normalized)
        return pipe.sampler_latents(ae.encode(images.to(ae.device, ae.dtype)))

    return Encoders(pipe.encode_prompt, encode_images)


def derive_seed(seed: int, *keys: object) -> int:
    """An independent 63-bit seed for (seed, keys): every random draw of training is named this way."""
    digest = hashlib.blake2b(json.dumps([seed, *keys]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(seed: int, *keys: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


# ---- finding the pairs ----


def scan(data: str | Path) -> list[Item]:
    """The (image, caption) pairs of a folder or a JSONL manifest; images without a caption are skipped (a warning)."""
    data = Path(data)
    if data.is_file() and data.suffix == ".jsonl":
        return _manifest(data)
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: no such folder or .jsonl manifest")
    items, uncaptioned = [], []
    for image in sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            uncaptioned.append(str(image))
            continue
        try:
            items.append(Item(image, caption.read_text(encoding="utf-8-sig").strip()))  # a BOM is not text
        except (OSError, UnicodeDecodeError) as e:
            warnings.warn(f"skipping {image}: its caption {caption} cannot be read as UTF-8 text ({e})")
    if uncaptioned:
        warnings.warn(f"{len(uncaptioned)} image(s) without a .txt caption are skipped: {', '.join(uncaptioned)}")
    if not items:
        raise ValueError(f"{data}: no image with a same-name .txt caption")
    return items


def _manifest(path: Path) -> list[Item]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(Item(path.parent / row["image"], str(row["caption"]).strip()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            expected = '{"image": path, "caption": text}'
            raise ValueError(f"{path}:{n}: expected {expected}, got {line[:80]!r} ({e!r})") from None
    if not items:
        raise ValueError(f"{path}: empty manifest")
    return items


# ---- sizes and pixels ----


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(height, width) buckets of at most resolution**2 pixels, sides multiples of 64 (16 below 256 px), aspect <= 2."""
    step = 64 if resolution >= 256 and resolution % 64 == 0 else 16
    area = resolution * resolution
    sizes = set()
    for w in range(step, 2 * resolution + 1, step):
        h = area // w // step * step
        if h >= step and max(h, w) <= 2 * min(h, w):
            sizes.add((h, w))
    return sorted(sizes)


def target_size(width: int, height: int, resolution: int, buckets: bool, native: bool = False) -> tuple[int, int]:
    """(H, W) an image of this size is cropped to. ValueError if `native` and a side is under 16 px."""
    if native:
        if min(width, height) < 16:
            raise ValueError(f"{width}x{height} is smaller than 16 px, the smallest side trained at its own size")
        return height // 16 * 16, width // 16 * 16
    if not buckets:
        return resolution, resolution
    ratio = math.log(width / height)
    return min(bucket_sizes(resolution), key=lambda hw: abs(math.log(hw[1] / hw[0]) - ratio))


def open_image(path: Path) -> Image.Image:
    """The image upright (EXIF orientation) as 8-bit "RGB", or for a greyscale mode of more bits (`WHITE`)
    as "F" in [0, 1] (scaled from its own range: 16-bit white is 65535); transparent pixels (RGBA, LA, PA,
    P or L with a transparent color) are composited over white. OSError if unreadable."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in WHITE:
            white = WHITE[im.mode]
            return im.convert("F").point(lambda v: v / white)
        if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
            over_white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(over_white, im.convert("RGBA")).convert("RGB")
        return im.convert("RGB")  # L, P, CMYK, YCbCr, ...: Pillow's conversions


def _load(path: Path, resolution: int, buckets: bool, native: bool = False) -> tuple[Tensor, float]:
    """`load_image`, and how much the image was enlarged (1 or less: not enlarged)."""
    im = open_image(path)
    H, W = target_size(im.width, im.height, resolution, buckets, native)
    s = 1.0 if native else max(W / im.width, H / im.height)  # native: cropped only
    w, h = max(W, round(im.width * s)), max(H, round(im.height * s))
    im = im.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - W) // 2, (h - H) // 2
    im = im.crop((left, top, left + W, top + H))
    if im.mode == "F":  # greyscale in [0, 1], float32 samples
        grey = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.float32).view(1, H, W)
        return (grey.expand(3, H, W) * 2 - 1).clamp(-1, 1), s  # clamped: Lanczos overshoots at edges
    pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(H, W, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1, s


def load_image(path: Path, resolution: int, buckets: bool, native: bool = False) -> Tensor:
    """(3, H, W) in [-1, 1]: resized to cover the target size (Lanczos), center-cropped. OSError if unreadable."""
    return _load(path, resolution, buckets, native)[0]


# ---- the cache ----


def cache_file(item: Item, cache_dir: Path, resolution: int, buckets: bool, tag: str, native: bool = False) -> Path:
    st = item.image.stat() if item.image.exists() else None
    key = [str(item.image.resolve()), st and st.st_size, st and st.st_mtime_ns, item.caption, resolution, buckets, tag]
    if native:  # appended only then: the keys of the other runs stay as they were
        key.append("native")
    return cache_dir / f"{hashlib.sha1(json.dumps(key).encode()).hexdigest()}.safetensors"


def _unreadable(cached: Path) -> Path:
    """The marker of an image that could not be read (safetensors with no tensors; the error in its header)."""
    return cached.with_suffix(".unreadable")


class CachedBatch(NamedTuple):
    """Cached pairs of one bucket, stacked."""

    latents: Tensor  # (B, z, h, w)
    context: Tensor  # (B, L, D)
    pooled: Tensor | None  # (B, P); None for FLUX.2


@dataclass
class CachedData:
    """The cached pairs: files and latent sizes (h, w); `skipped`: the images that could not be read."""

    files: list[Path]
    sizes: list[tuple[int, int]]
    skipped: int = 0
    encoded: int = 0  # pairs encoded by this run (all processes)
    empty: CachedBatch | None = None  # the empty caption's embeddings, for caption dropout (`empty_caption`)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, indices: list[int], device: torch.device | str = "cpu") -> CachedBatch:
        rows = [load_file(self.files[i]) for i in indices]
        latents, context = (torch.stack([r[k] for r in rows]).to(device) for k in ("latent", "context"))
        pooled = torch.stack([r["pooled"] for r in rows]).to(device) if "pooled" in rows[0] else None
        return CachedBatch(latents, context, pooled)

    def with_empty_caption(self, dropped: list[bool], context: Tensor, pooled: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """`context` (B, L, D) and `pooled` (B, P) or None with the empty caption's in the rows where `dropped`."""
        if not any(dropped):
            return context, pooled
        if self.empty is None or self.empty.context.shape != context.shape[1:]:
            raise ValueError(f"the empty caption's embeddings {None if self.empty is None else tuple(self.empty.context.shape)} "
                             f"do not match the captions' {tuple(context.shape[1:])}: caption dropout needs text "
                             "embeddings padded to one length")
        rows = torch.tensor(dropped, device=context.device)
        context = torch.where(rows[:, None, None], self.empty.context.to(context), context)
        if pooled is not None:
            pooled = torch.where(rows[:, None], self.empty.pooled.to(pooled), pooled)
        return context, pooled


def _encode(items: list[Item], files: list[Path], resolution: int, buckets: bool, encoders: Encoders,
            native: bool = False) -> None:
    """Encode the pairs and write each to its cache file; unreadable images are skipped with a warning."""
    pixels: dict[int, Tensor] = {}  # index -> (3, H, W)
    by_size: dict[tuple[int, int], list[int]] = {}  # (H, W) -> indices: images encoded together are one size
    enlarged: dict[Path, float] = {}  # image -> factor, for those smaller than their target size
    for i, item in enumerate(items):
        try:
            pixels[i], factor = _load(item.image, resolution, buckets, native)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            warnings.warn(f"skipping unreadable image {item.image}: {e}")
            with writing(_unreadable(files[i])):
                save_safetensors_atomic({}, _unreadable(files[i]), {"image": str(item.image), "error": str(e)})
            continue
        if factor > 1:
            enlarged[item.image] = factor
        by_size.setdefault(tuple(pixels[i].shape[1:]), []).append(i)
    if enlarged:
        most = max(enlarged, key=enlarged.get)
        warnings.warn(f"{len(enlarged)} of {len(pixels)} images are smaller than the training size (--resolution "
                      f"{resolution}) and are enlarged, up to {enlarged[most]:.3g}x ({most}): pass a smaller "
                      "--resolution to train at their size")
    with torch.no_grad():
        for group in by_size.values():
            for start in range(0, len(group), ENCODE_BATCH):
                chunk = group[start : start + ENCODE_BATCH]
                latents = encoders.encode_images(torch.stack([pixels[i] for i in chunk]))  # (b, z, h, w)
                context, pooled = encoders.encode_prompts([items[i].caption for i in chunk])
                for b, i in enumerate(chunk):
                    tensors = {"latent": latents[b], "context": context[b]}
                    if pooled is not None:
                        tensors["pooled"] = pooled[b]
                    meta = {"image": str(items[i].image), "caption": items[i].caption}
                    with writing(files[i]):
                        save_safetensors_atomic(tensors, files[i], meta)


def prepare(
    items: list[Item],
    cache_dir: str | Path,
    resolution: int,
    buckets: bool,
    tag: str,
    get_encoders: Callable[[], Encoders],
    native: bool = False,
) -> CachedData:
    """Cache what is not cached yet (encoders loaded only then, each process taking every n-th pair) and
    return the cached pairs. `tag` names the encoders (model source and dtype) in the cache keys."""
    cache_dir = Path(cache_dir)
    files = [cache_file(it, cache_dir, resolution, buckets, tag, native) for it in items]
    known_bad = [it.image for it, f in zip(items, files) if _unreadable(f).is_file()]
    pending = [i for i, f in enumerate(files) if not f.is_file() and not _unreadable(f).is_file()]
    dist.barrier()  # every process has seen the same pending list before any writes
    if known_bad and dist.rank() == 0:
        warnings.warn(f"skipping {len(known_bad)} image(s) found unreadable before: {', '.join(map(str, known_bad))}")
    mine = pending[dist.rank() :: dist.world()]
    if mine:
        _encode([items[i] for i in mine], [files[i] for i in mine], resolution, buckets, get_encoders(), native)
    dist.barrier()
    kept = [f for f in files if f.is_file()]
    if not kept:
        raise ValueError(f"none of the {len(items)} images could be read")
    sizes = [tuple(read_header(f)["latent"]["shape"][1:]) for f in kept]
    return CachedData(kept, sizes, skipped=len(items) - len(kept), encoded=sum(files[i].is_file() for i in pending))


def empty_caption(cache_dir: str | Path, tag: str, get_encoders: Callable[[], Encoders]) -> CachedBatch:
    """The text embeddings of the empty caption (what caption dropout trains with, and true CFG samples
    against): `latents` empty (0,), `context` (L, D), `pooled` (P,) or None. Encoded once by the first
    process and cached beside the pairs (`empty-caption-<hash of tag>.safetensors`)."""
    path = Path(cache_dir) / f"empty-caption-{hashlib.sha1(tag.encode()).hexdigest()[:16]}.safetensors"
    if dist.rank() == 0 and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            context, pooled = get_encoders().encode_prompts([""])  # (1, L, D), (1, P) or None
        tensors = {"context": context[0].cpu()} | ({"pooled": pooled[0].cpu()} if pooled is not None else {})
        with writing(path):
            save_safetensors_atomic(tensors, path, {"caption": "", "tag": tag})
    dist.barrier()
    row = load_file(path)
    return CachedBatch(torch.zeros(0), row["context"], row.get("pooled"))


# ---- batches ----


class BatchSampler:
    """Global batches of pair indices, all of one latent size, as a pure function of (seed, step)."""

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, seed: int):
        self.batch_size, self.seed = batch_size, seed
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(sizes):
            self.buckets.setdefault(s, []).append(i)
        self.per_epoch = sum(math.ceil(len(m) / batch_size) for m in self.buckets.values())
        self._epoch, self._batches_of_epoch = -1, []  # the batches of the epoch last asked for

    def _batches(self, epoch: int) -> list[list[int]]:
        g = generator(self.seed, "epoch", epoch)
        batches = []
        for size in sorted(self.buckets):
            members = self.buckets[size]
            order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
            n = math.ceil(len(order) / self.batch_size) * self.batch_size
            cycled = (order * math.ceil(n / len(order)))[:n]  # the last batch topped up from the start
            batches += [cycled[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __call__(self, step: int) -> list[int]:
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches_of_epoch = epoch, self._batches(epoch)
        return self._batches_of_epoch[j]
