"""A deterministic compositional evaluator for the scenes of scripts/scenes.py (no learned model).

For each object a prompt names, the evaluator looks for its color: every pixel is labelled with the
nearest palette color (or the white background), if one is within `MAX_DISTANCE`, and the labels are
smoothed (a pixel alone in its 3x3 window with its label takes the window's majority label: stray
pixels of a sampled image go, shapes stay); the largest
4-connected region of the object's color, if it has at least `MIN_AREA` pixels, is the object. Its
shape is the one (circle, square, triangle) whose drawing in the region's bounding box overlaps the
region best, if well enough (`MIN_IOU`); its position is the region's centroid. Scores per prompt, in the categories of
T2I-CompBench (arXiv 2307.06350; there a VQA model or a detector scores them):

- color:   the fraction of the named objects whose color is found (attribute presence);
- shape:   the fraction whose color region has the named shape (shape bound to its color);
- spatial: two-object prompts: 1 if both are found and the centroids stand in the named relation
           (the displacement along the relation's axis has the right sign and is the larger one);
- all:     1 if every object is found with its shape and the relation holds.

A category's score is its mean over the (prompt, seed) items (spatial: over two-object prompts), with
its 95% bootstrap interval (benchmarks/stats.py). Ground-truth renders score 1.0 in every category, at
32x32 and at other sizes (tests/test_compbench.py).

Other sizes: a scene at W x H draws its shapes scaled by k = min(W, H) / 32 (scripts/scenes.py), so the
smallest region that counts is MIN_AREA * k**2 pixels (not scaled by the canvas area: a 64x32 canvas has
shapes of the 32x32 size).

    python -m benchmarks.compbench [--model FOLDER] [--size WxH] [--seeds 3] [--steps 20] [--taca 1.2 --taca-until 0.97] [--lora FILE]

samples the held-out prompts of scripts/scenes.py with the model (default: the shipped tiny one) at
its default size (or `--size`) and prints the scores. The pipeline runs in float32 on the CPU (`load`:
float16 and bfloat16 matmuls are several times slower there), as `mmdit sample` runs it; the model's
sampling defaults (steps, guidance) apply unless a flag says otherwise.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

import convert
from benchmarks.stats import category_intervals
from sampling import Pipeline, TacaSchedule, load_pipeline
from sampling import default_model
from sampling.cli import DTYPES, parse_size
from scripts.scenes import BACKGROUND, COLORS, SHAPES, SIZE, draw_shape, heldout_prompts, parse

MAX_DISTANCE = 0.35  # RGB distance in [0, 1] units within which a pixel takes a palette color
MIN_AREA = 12  # pixels (shapes of the 32x32 size) of the smallest region that counts as an object
MIN_IOU = 0.6  # a region is a shape if it overlaps the shape drawn in its bounding box this much
MAX_ASPECT = 1.6  # longer over shorter bounding-box side; beyond it, no shape of ours
CATEGORIES = ("color", "shape", "spatial", "all")


@dataclass(frozen=True)
class Region:
    """The largest region of one color: size, centroid (x right, y down), bounding box in pixels, shape."""

    area: int
    cx: float
    cy: float
    width: int
    height: int
    shape: str | None


def shape_of(pixels: list[tuple[int, int]]) -> str | None:
    """The shape whose drawing in the region's bounding box overlaps the region best (intersection over
    union), if that is at least MIN_IOU and the box is not too elongated."""
    ys, xs = [p[0] for p in pixels], [p[1] for p in pixels]
    y0, x0, h, w = min(ys), min(xs), max(ys) - min(ys) + 1, max(xs) - min(xs) + 1
    if max(w, h) > MAX_ASPECT * min(w, h):
        return None
    region = torch.zeros(h, w, dtype=torch.bool)
    region[torch.tensor(ys) - y0, torch.tensor(xs) - x0] = True
    best, best_iou = None, MIN_IOU
    for shape in SHAPES:
        im = Image.new("L", (w, h))
        draw_shape(ImageDraw.Draw(im), shape, (0, 0, w - 1, h - 1), 1)
        template = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w).bool()
        iou = (region & template).sum().item() / (region | template).sum().item()
        if iou >= best_iou:
            best, best_iou = shape, iou
    return best


def labels(image: Tensor) -> Tensor:
    """(3, H, W) in [0, 1] -> (H, W) index into [background, *COLORS], or -1 where no color is near enough;
    then a pixel that shares its label with fewer than 3 of its 3x3 window (itself included) takes the
    window's most common label: stray pixels and pinholes go, corners and tips stay."""
    palette = torch.tensor([BACKGROUND, *COLORS.values()], dtype=torch.float32) / 255  # (1 + K, 3)
    dist = torch.cdist(image.float().flatten(1).T, palette)  # (H W, 1 + K)
    d, idx = dist.min(dim=1)
    raw = torch.where(d <= MAX_DISTANCE, idx + 1, 0).view(image.shape[1:])  # 0: no color
    onehot = F.one_hot(raw, len(palette) + 1).permute(2, 0, 1).float()  # (2 + K, H, W)
    votes = F.avg_pool2d(onehot[None], 3, stride=1, padding=1, divisor_override=1)[0]  # (2 + K, H, W) counts
    own = votes.gather(0, raw[None])[0]
    return torch.where(own >= 3, raw, votes.argmax(0)) - 1


def largest_region(mask: list[list[bool]]) -> list[tuple[int, int]]:
    """The pixels (y, x) of the largest 4-connected region of a boolean grid (a flood fill)."""
    H, W = len(mask), len(mask[0])
    seen = [[False] * W for _ in range(H)]
    best: list[tuple[int, int]] = []
    for y0 in range(H):
        for x0 in range(W):
            if not mask[y0][x0] or seen[y0][x0]:
                continue
            seen[y0][x0] = True
            stack, region = [(y0, x0)], []
            while stack:
                y, x = stack.pop()
                region.append((y, x))
                for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= ny < H and 0 <= nx < W and mask[ny][nx] and not seen[ny][nx]:
                        seen[ny][nx] = True
                        stack.append((ny, nx))
            if len(region) > len(best):
                best = region
    return best


def find(label_map: Tensor, color: str) -> Region | None:
    """The largest region of `color` in a label map (H, W), or None if it is smaller than MIN_AREA * k**2 pixels,
    k = min(H, W) / SIZE the scale scripts/scenes.py draws shapes at on that canvas."""
    label = 1 + list(COLORS).index(color)
    pixels = largest_region((label_map == label).tolist())
    k = min(label_map.shape) / SIZE
    if len(pixels) < MIN_AREA * k**2:
        return None
    ys, xs = [p[0] for p in pixels], [p[1] for p in pixels]
    return Region(len(pixels), sum(xs) / len(xs), sum(ys) / len(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1,
                  shape_of(pixels))


def relation_holds(a: Region, relation: str, b: Region) -> bool:
    """A <relation> B for the centroids: the right sign along the relation's axis, and that axis dominant."""
    dx, dy = a.cx - b.cx, a.cy - b.cy  # y grows downwards
    along, across = {"to the left of": (-dx, dy), "to the right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along > 0 and along > abs(across)


def score(image: Tensor, caption: str) -> dict[str, float | None]:
    """The scores of one image (3, H, W) in [0, 1] for its caption; spatial is None for one object."""
    scene = parse(caption)
    label_map = labels(image)
    found = [find(label_map, o.color) for o in scene.objects]
    color = [r is not None for r in found]
    shape = [r is not None and r.shape == o.shape for r, o in zip(found, scene.objects)]
    spatial = None
    if scene.relation is not None:
        a, b = found
        spatial = float(a is not None and b is not None and relation_holds(a, scene.relation, b))
    return {
        "color": sum(color) / len(color),
        "shape": sum(shape) / len(shape),
        "spatial": spatial,
        "all": float(all(shape) and spatial in (None, 1.0)),
    }


def summarize(scores: Sequence[dict[str, float | None]]) -> dict[str, float]:
    """Mean of each category over the prompts that have it."""
    out = {}
    for c in CATEGORIES:
        values = [s[c] for s in scores if s[c] is not None]
        out[c] = sum(values) / len(values) if values else float("nan")
    return out


def seed_noise(shape: tuple[int, ...], seed: int) -> Tensor:
    """The initial latents of one seed, the same for every prompt (so settings compare on equal draws)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def load(model: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None) -> Pipeline:
    """The pipeline of `model` (default: the shipped tiny one) on `device`, in `dtype`: default float32 on
    the CPU (the file's float16 runs its linear layers about 4x slower there), bfloat16 elsewhere, as
    `mmdit sample` chooses (sampling/cli.py)."""
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    return load_pipeline(model or default_model(), device=device, dtype=dtype)


def default_size(pipe: Pipeline) -> tuple[int, int]:
    """(width, height): the model's default image size (its sampling_defaults)."""
    return pipe.defaults.size, pipe.defaults.size


def generate(pipe, prompts: list[str], seeds: Sequence[int], steps: int | None = None, temperature=None,
             batch: int = 256, size: tuple[int, int] | None = None) -> list[tuple[str, Tensor]]:
    """(prompt, image (3, H, W) in [0, 1]) for every prompt and seed, seed-major, at size (width, height)
    (default: the model's). The model's other sampling defaults (guidance, steps unless given) apply."""
    width, height = size or default_size(pipe)
    weight = next(pipe.transformer.parameters())
    if weight.device.type == "cpu" and weight.dtype != torch.float32:
        warnings.warn(f"the transformer runs in {weight.dtype} on the CPU, several times slower than float32 there: "
                      "load the pipeline with benchmarks.compbench.load (or dtype=torch.float32)", stacklevel=2)
    f, z = pipe.autoencoder.params.downscale, pipe.autoencoder.params.z_channels
    jobs = [(p, s) for s in seeds for p in prompts]
    out = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        noise = torch.stack([seed_noise((z, height // f, width // f), s) for _, s in chunk])  # (B, z, H/f, W/f)
        images = pipe.generate([p for p, _ in chunk], height=height, width=width, steps=steps, noise=noise,
                               temperature=temperature, output="tensor")
        out += [(p, im) for (p, _), im in zip(chunk, images)]
    return out


def score_items(pipe, prompts: list[str], seeds: Sequence[int], steps: int | None = None, temperature=None,
                size: tuple[int, int] | None = None) -> list[dict[str, float | None]]:
    """The scores of every (prompt, seed) item, seed-major (the same order for every setting: pairable)."""
    return [score(im, p) for p, im in generate(pipe, prompts, seeds, steps, temperature, size=size)]


def evaluate(pipe, prompts: list[str], seeds: Sequence[int], steps: int | None = None, temperature=None,
             size: tuple[int, int] | None = None) -> dict[str, float]:
    """Category scores of the pipeline on the prompts, one image per prompt and seed, at size (width, height)."""
    return summarize(score_items(pipe, prompts, seeds, steps, temperature, size))


def format_scores(scores: dict) -> str:
    """"color 0.412  shape ..." for means, "color 0.412 [0.37, 0.45]  ..." for intervals (benchmarks/stats.py)."""
    return "  ".join(f"{c} {scores[c]:.3f}" if isinstance(scores[c], float) else f"{c} {scores[c]}" for c in CATEGORIES)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compbench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: the shipped tiny model)")
    ap.add_argument("--size", type=parse_size, metavar="WxH", help="image size (default: the model's)")
    ap.add_argument("--device", default="cpu", help="default cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on the CPU, bf16 elsewhere")
    ap.add_argument("--seeds", type=int, default=3, help="images per prompt, seeds 0..N-1 (default 3)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    ap.add_argument("--taca", type=float, metavar="GAMMA", help="TACA temperature (default: none, plain attention)")
    ap.add_argument("--taca-until", type=float, default=0.97, metavar="T",
                    help="TACA while t >= T (default 0.97)")
    ap.add_argument("--lora", type=Path, help="a LoRA to apply (gated to the TACA steps when --taca is given)")
    args = ap.parse_args(argv)
    if args.seeds < 1 or (args.steps is not None and args.steps < 1):
        ap.error("--seeds and --steps must be at least 1")
    torch.manual_seed(0)
    pipe = load(args.model, args.device, args.dtype and DTYPES[args.dtype])
    if args.lora:
        convert.load_lora(pipe.transformer, args.lora)
    taca = None if args.taca is None else TacaSchedule(args.taca, args.taca_until)
    prompts = heldout_prompts()
    width, height = args.size or default_size(pipe)
    items = score_items(pipe, prompts, range(args.seeds), args.steps, taca, (width, height))
    print(f"{len(prompts)} held-out prompts x {args.seeds} seeds at {width}x{height}, mean [95% interval]: "
          f"{format_scores(category_intervals(items, CATEGORIES))}")


if __name__ == "__main__":
    main()
