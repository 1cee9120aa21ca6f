"""Procedural scenes of colored shapes with spatial relations: the toy data of the embedded tiny model.

A scene is one or two shapes (circle, square, triangle) in named saturated colors on a white canvas
(32x32; or any size of sides >= 32, the shapes scaled by min(width, height) / 32); two shapes stand in a relation (left of, right of, above, below). Captions follow one grammar:

    "a red circle"                                   one object
    "a red circle to the left of a blue square"      two objects, A <relation> B

The two objects of a scene always have different colors, so an evaluator can find each one by its
color (benchmarks/compbench.py). "A to the left of B" and "B to the right of A" are the same
layout: the held-out split holds out layouts (`layout_key`), both phrasings at once, so no held-out
prompt describes a picture seen in training. Everything is a pure function of a seed.

    python -m scripts.scenes OUT_DIR [--per-layout 8] [--per-object 40] [--seed 0] [--size 64x32]

writes `OUT_DIR/train/NNNNN.png` + `.txt` (the format `mmdit train --data` reads) and
`OUT_DIR/heldout.txt` (one held-out prompt per line).
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

SIZE = 32  # canvas side, pixels
BACKGROUND = (255, 255, 255)
COLORS = {  # saturated and far apart in RGB, so a color is found by its distance alone
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("to the left of", "to the right of", "above", "below")
HELDOUT_FRACTION = 0.1
SPLIT_SEED = 1234  # fixed: the split is part of the benchmark's definition, not of a run
MIN_SIDE, MAX_SIDE = 9, 12  # shape bounding-box side, pixels


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    cx: float = 0.0  # bounding-box center, pixels (x right, y down)
    cy: float = 0.0
    side: int = 0  # bounding-box side, pixels

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # one, or two in caption order (A, B)
    relation: str | None = None  # A <relation> B
    width: int = SIZE  # canvas, pixels
    height: int = SIZE

    @property
    def caption(self) -> str:
        a = f"a {self.objects[0].name}"
        return a if self.relation is None else f"{a} {self.relation} a {self.objects[1].name}"


def objects() -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES]


def layout_key(a: tuple[str, str], relation: str, b: tuple[str, str]) -> tuple:
    """The picture a two-object caption describes: ("h", left, right) or ("v", top, bottom)."""
    if relation == "to the left of":
        return ("h", a, b)
    if relation == "to the right of":
        return ("h", b, a)
    if relation == "above":
        return ("v", a, b)
    if relation == "below":
        return ("v", b, a)
    raise ValueError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")


def all_layouts() -> list[tuple]:
    """Every two-object layout: ordered pairs of objects of different colors, side by side or stacked."""
    pairs = [(a, b) for a in objects() for b in objects() if a[0] != b[0]]
    return [(axis, a, b) for axis in ("h", "v") for a, b in pairs]


def heldout_layouts() -> set[tuple]:
    """The held-out tenth of the layouts (a fixed draw, the same for every run)."""
    layouts = all_layouts()
    rng = random.Random(SPLIT_SEED)
    return set(rng.sample(layouts, round(HELDOUT_FRACTION * len(layouts))))


def captions_of(layout: tuple) -> list[tuple[tuple[str, str], str, tuple[str, str]]]:
    """Both phrasings (A, relation, B) of a layout."""
    axis, first, second = layout
    if axis == "h":
        return [(first, "to the left of", second), (second, "to the right of", first)]
    return [(first, "above", second), (second, "below", first)]


def heldout_prompts() -> list[str]:
    """Every phrasing of every held-out layout, sorted."""
    return sorted(Scene((Obj(*a), Obj(*b)), rel).caption for lay in heldout_layouts() for a, rel, b in captions_of(lay))


# ---- placing and drawing ----


def place(a: tuple[str, str], relation: str | None, b: tuple[str, str] | None, rng: random.Random,
          width: int = SIZE, height: int = SIZE) -> Scene:
    """A random placement on a `width` x `height` canvas that makes the caption true with a clear margin
    (>= 12 px along the axis, <= 4 px across it, at 32x32). Sides and margins scale with
    k = min(width, height) / 32, so a 64x64 scene is a 32x32 one at twice the resolution and a 64x32
    one has the same shapes with more room along its width. At 32x32 the draws are those of the first
    (32x32-only) version of this function, so its datasets are unchanged."""
    k = min(width, height) / SIZE
    lo_side, hi_side = round(MIN_SIDE * k), round(MAX_SIDE * k)
    if relation is None:
        side = rng.randint(lo_side, hi_side)
        return Scene((Obj(*a, rng.uniform(side / 2 + k, width - side / 2 - k),
                          rng.uniform(side / 2 + k, height - side / 2 - k), side),), width=width, height=height)
    axis, first, _ = layout_key(a, relation, b)
    along, across_size = (width, height) if axis == "h" else (height, width)  # canvas sides, pixels
    s1, s2 = rng.randint(lo_side, hi_side), rng.randint(lo_side, hi_side)
    along1 = rng.uniform(s1 / 2 + k, min(along / 2 - 2 * k, along - s2 / 2 - 13 * k))  # the first in the left / top half
    along2 = rng.uniform(max(along / 2 + 2 * k, along1 + 12 * k), along - s2 / 2 - k)
    across = rng.uniform(hi_side / 2 + 3 * k, across_size - hi_side / 2 - 3 * k)
    across1, across2 = across + rng.uniform(-2 * k, 2 * k), across + rng.uniform(-2 * k, 2 * k)
    xy1, xy2 = ((along1, across1), (along2, across2)) if axis == "h" else ((across1, along1), (across2, along2))
    o1, o2 = (a, b) if first == a else (b, a)
    placed = {o1: Obj(*o1, *xy1, s1), o2: Obj(*o2, *xy2, s2)}
    return Scene((placed[a], placed[b]), relation, width, height)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """A shape filling the pixel box (x0, y0, x1, y1), corners included."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":  # pointing up
        draw.polygon(((x0, y1), (x1, y1), ((x0 + x1) / 2, y0)), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def draw_object(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    x0, y0 = round(o.cx - o.side / 2), round(o.cy - o.side / 2)
    draw_shape(draw, o.shape, (x0, y0, x0 + o.side - 1, y0 + o.side - 1), COLORS[o.color])


def render(scene: Scene) -> Image.Image:
    """The scene as a `scene.width` x `scene.height` RGB image (no anti-aliasing: every pixel is the background
    or a palette color)."""
    im = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for o in scene.objects:
        draw_object(draw, o)
    return im


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [0, 1]."""
    pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return pixels.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255


# ---- captions back to their parts ----

_WORD = r"(\w+) (\w+)"
_CAPTION = re.compile(rf"a {_WORD}(?: ({'|'.join(RELATIONS)}) a {_WORD})?")


def parse(caption: str) -> Scene:
    """The objects (colors and shapes, no placement) and relation of a caption of the grammar above."""
    m = _CAPTION.fullmatch(caption.strip().lower())
    if m is None:
        raise ValueError(f"{caption!r} is not a scene caption ('a red circle' or 'a red circle above a blue square')")
    c1, s1, rel, c2, s2 = m.groups()
    objs = [(c1, s1)] + ([(c2, s2)] if rel else [])
    for c, s in objs:
        if c not in COLORS or s not in SHAPES:
            raise ValueError(f"{caption!r}: unknown color or shape {c!r} {s!r}; "
                             f"colors {list(COLORS)}, shapes {list(SHAPES)}")
    return Scene(tuple(Obj(c, s) for c, s in objs), rel)


# ---- the training set ----


def training_scenes(per_layout: int, per_object: int, seed: int, width: int = SIZE, height: int = SIZE) -> list[Scene]:
    """`per_layout` placements of each phrasing of each training layout, and `per_object` single objects, on a
    `width` x `height` canvas. Other sizes than 32x32 draw from their own stream of the seed."""
    rng = random.Random(seed if (width, height) == (SIZE, SIZE) else f"{seed}:{width}x{height}")
    held = heldout_layouts()
    scenes = [place(o, None, None, rng, width, height) for o in objects() for _ in range(per_object)]
    for lay in all_layouts():
        if lay in held:
            continue
        for a, rel, b in captions_of(lay):
            scenes += [place(a, rel, b, rng, width, height) for _ in range(per_layout)]
    return scenes


def write_scenes(folder: Path, scenes: list[Scene]) -> None:
    """`folder/NNNNN.png` + `.txt` (image and caption) for each scene: the format `mmdit train --data` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        render(scene).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(scene.caption + "\n")


def write_dataset(out: Path, per_layout: int = 8, per_object: int = 40, seed: int = 0,
                  width: int = SIZE, height: int = SIZE) -> Path:
    """Write `out/train/NNNNN.png` + `.txt` at `width` x `height` and `out/heldout.txt`; returns `out/train`."""
    train = out / "train"
    write_scenes(train, training_scenes(per_layout, per_object, seed, width, height))
    (out / "heldout.txt").write_text("\n".join(heldout_prompts()) + "\n")
    return train


def parse_size(text: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" -> (width, height); sides of at least 32 px (a two-shape scene needs them)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 64x32, got {text!r}") from None
    if min(w, h) < SIZE:
        raise argparse.ArgumentTypeError(f"{text}: sides must be at least {SIZE} px")
    return w, h


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.scenes", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for train/ and heldout.txt")
    ap.add_argument("--per-layout", type=int, default=8, help="placements per training caption (default 8)")
    ap.add_argument("--per-object", type=int, default=40, help="single-object images per (color, shape) (default 40)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the placements (default 0)")
    ap.add_argument("--size", type=parse_size, default=(SIZE, SIZE), help=f"canvas WIDTHxHEIGHT (default {SIZE}x{SIZE})")
    args = ap.parse_args(argv)
    train = write_dataset(args.out, args.per_layout, args.per_object, args.seed, *args.size)
    print(f"wrote {len(list(train.glob('*.png')))} images to {train} and {len(heldout_prompts())} held-out prompts")


if __name__ == "__main__":
    main()
