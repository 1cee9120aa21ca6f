"""The paper's phenomenon per resolution: how much attention image queries pay to text, layer by layer, at each
image size the model was trained at, without and with TACA, beside the share a uniform attention would give.

TACA's motivation (arXiv 2506.07986, the suppression of cross-modal attention): in the joint softmax over
`[text | image]` keys, an image query's weight on the text keys (its *text mass*) shrinks as the image
grows, since the image keys outnumber the text keys more and more. A uniform attention would give text
`L_txt / (L_txt + L_img)` (the *uniform share*); TACA scales the image-to-text logits by gamma to raise
the mass back.

    python -m benchmarks.probe_sizes [--model FOLDER] [--sizes 32x32 64x64 64x32 32x64] [--prompts 8]
                                     [--seeds 2] [--taca 1.2] [--steps N] [--out runs/probe-sizes]

For each size (default: the model's `sampling_defaults.trained_sizes`, else its default size), samples
`--prompts` held-out prompts of scripts/scenes.py (evenly spaced in their sorted list) x `--seeds` seeds
(benchmarks/compbench.py's initial noise), once with plain attention and once with TACA at gamma
`--taca` on every step, under the attention probe (mmdit/probe.py, as `mmdit probe` uses it). Per
layer, the text mass is averaged over image queries, heads, steps, prompts and seeds (with classifier-free
guidance, over the positive branch only). Prints the table (rows: layers; columns: size x {plain, TACA,
uniform}), writes `OUT/probe_sizes.csv` and `OUT/probe_sizes.png` (one panel per size: the mass per layer,
plain and TACA, the uniform share as a dashed line; drawn with PIL) and the section "The image-to-text
attention per resolution (CPU)" of benchmarks/RESULTS.md (`--dry-run`: not that).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from benchmarks.compbench import default_size, load, seed_noise
from benchmarks.results import machine, write_section
from convert.files import write_atomic
from mmdit.probe import probe_attention
from sampling import Pipeline, default_model
from sampling.cli import parse_size
from sampling.probe import vertical_text
from scripts.scenes import heldout_prompts

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## The image-to-text attention per resolution (CPU)"
PLAIN, TACA, UNIFORM = (33, 102, 172), (178, 24, 43), (110, 110, 110)  # figure colors: blue, red, gray


@dataclass(frozen=True)
class LayerMass:
    """The mean text mass of image queries per layer, at one image size and one temperature."""

    layers: list[str]  # block names in the order the model runs them: "double_blocks.0", ...
    mass: list[float]  # per layer: mean over image queries, heads, steps, prompts and seeds
    n_txt: int  # text tokens
    n_img: int  # image tokens

    @property
    def uniform(self) -> float:
        """The text mass of a uniform attention: L_txt / (L_txt + L_img)."""
        return self.n_txt / (self.n_txt + self.n_img)


def spread(items: Sequence[str], n: int) -> list[str]:
    """n items evenly spaced in the list (all of them if there are no more than n)."""
    return list(items) if n >= len(items) else [items[i * len(items) // n] for i in range(n)]


def layer_mass(pipe: Pipeline, prompts: list[str], seeds: Sequence[int], size: tuple[int, int],
               temperature=None, steps: int | None = None) -> LayerMass:
    """Sample every (prompt, seed) at size (width, height) in one batch under the attention probe; the text
    mass per layer averaged over image queries (the probe's own mean), heads, steps and items. With CFG
    the batch is [negative | positive] (sampling/sampler.py): the last B rows are the prompts'."""
    width, height = size
    f, z = pipe.autoencoder.params.downscale, pipe.autoencoder.params.z_channels
    jobs = [(p, s) for s in seeds for p in prompts]
    noise = torch.stack([seed_noise((z, height // f, width // f), s) for _, s in jobs])  # (B, z, H/f, W/f)
    with probe_attention(pipe.transformer) as probe:
        pipe.generate([p for p, _ in jobs], height=height, width=width, steps=steps, noise=noise,
                      temperature=temperature, output="latent")
    B, layers = len(jobs), probe.layers()
    per_layer: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for r in probe.records:
        per_layer[r.layer].append(r.text_mass[-B:])  # (B, H) of one step
    first = probe.records[0]
    return LayerMass(layers, [torch.stack(per_layer[n]).double().mean().item() for n in layers], first.n_txt, first.n_img)


def measure(pipe: Pipeline, sizes: Sequence[tuple[int, int]], prompts: list[str], seeds: Sequence[int],
            gamma: float, steps: int | None = None) -> dict[tuple[int, int], tuple[LayerMass, LayerMass]]:
    """Per size (width, height): (plain, TACA at `gamma` on every step)."""
    out = {}
    for size in sizes:
        t0 = time.perf_counter()
        out[size] = (layer_mass(pipe, prompts, seeds, size, None, steps), layer_mass(pipe, prompts, seeds, size, gamma, steps))
        print(f"{size[0]}x{size[1]}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def table(results: dict[tuple[int, int], tuple[LayerMass, LayerMass]]) -> str:
    """Markdown: one row per layer (and their mean), columns size x {plain, TACA, uniform}."""
    cols = ["layer"] + [f"{name(s)} {what}" for s in results for what in ("plain", "TACA", "uniform")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    layers = next(iter(results.values()))[0].layers
    for j, layer in enumerate(layers + ["mean"]):
        cells = [layer]
        for plain, taca in results.values():
            if layer == "mean":
                cells += [f"{sum(plain.mass) / len(plain.mass):.4f}", f"{sum(taca.mass) / len(taca.mass):.4f}"]
            else:
                cells += [f"{plain.mass[j]:.4f}", f"{taca.mass[j]:.4f}"]
            cells.append(f"{plain.uniform:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(results: dict[tuple[int, int], tuple[LayerMass, LayerMass]], gamma: float, path: Path) -> None:
    """One row per (size, layer): width, height, layer, n_txt, n_img, uniform, plain, taca, gamma."""
    fields = ["width", "height", "layer", "n_txt", "n_img", "uniform", "plain", "taca", "gamma"]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(fields)
            for (width, height), (plain, taca) in results.items():
                for layer, p, t in zip(plain.layers, plain.mass, taca.mass):
                    w.writerow([width, height, layer, plain.n_txt, plain.n_img, f"{plain.uniform:.6g}", f"{p:.6g}",
                                f"{t:.6g}", f"{gamma:g}"])

    write_atomic(path, write)


PANEL_H, LEFT, PLOT_W, TOP = 170, 56, 360, 34  # a panel's plot height, left margin, least plot width, title band


def panel(size: tuple[int, int], plain: LayerMass, taca: LayerMass, gamma: float, ymax: float) -> Image.Image:
    """One size: the text mass per layer (x) plain (blue) and TACA (red), the uniform share dashed (gray)."""
    labels = [vertical_text(n) for n in plain.layers]
    label_h = max(im.height for im in labels)
    n = len(plain.layers)
    step = max(16, PLOT_W // n)  # pixels per layer
    width = LEFT + n * step + 20
    title = (f"{name(size)}: {plain.n_txt} text + {plain.n_img} image tokens, uniform share {plain.uniform:.4f}; "
             f"text mass per layer")
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    image = Image.new("RGB", (max(width, round(measure(title)) + 8), TOP + PANEL_H + label_h + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 2), title, fill="black")
    legend_x = 4
    for text, rgb in (("plain", PLAIN), (f"TACA gamma {gamma:g}", TACA), ("uniform share (dashed)", UNIFORM)):
        draw.text((legend_x, 16), text, fill=rgb)
        legend_x += draw.textlength(text) + 14

    def y(v: float) -> float:  # mass -> pixel row, 0 at the bottom of the plot
        return TOP + PANEL_H * (1 - v / ymax)

    def x(j: int) -> float:
        return LEFT + j * step + step / 2

    for i in range(5):  # the value axis
        v = ymax * i / 4
        draw.line((LEFT - 4, y(v), LEFT + n * step, y(v)), fill=(225, 225, 225))
        draw.text((4, y(v) - 6), f"{v:.3f}", fill="black")
    draw.line((LEFT, TOP, LEFT, TOP + PANEL_H), fill="black")
    for x0 in range(LEFT, LEFT + n * step, 8):
        draw.line((x0, y(plain.uniform), x0 + 4, y(plain.uniform)), fill=UNIFORM, width=2)
    for series, rgb in ((plain.mass, PLAIN), (taca.mass, TACA)):
        points = [(x(j), y(v)) for j, v in enumerate(series)]
        draw.line(points, fill=rgb, width=2)
        for px, py in points:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=rgb)
    for j, label in enumerate(labels):
        image.paste(label, (round(x(j) - label.width / 2), TOP + PANEL_H + 6))
    return image


def figure(results: dict[tuple[int, int], tuple[LayerMass, LayerMass]], gamma: float) -> Image.Image:
    """One panel per size, stacked, on one value scale (so the sizes compare by eye)."""
    ymax = 1.1 * max(max(*p.mass, *t.mass, p.uniform) for p, t in results.values())
    panels = [panel(size, plain, taca, gamma, ymax) for size, (plain, taca) in results.items()]
    out = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    top = 0
    for p in panels:
        out.paste(p, (0, top))
        top += p.height
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.probe_sizes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: the shipped tiny model)")
    ap.add_argument("--sizes", type=parse_size, nargs="+", metavar="WxH",
                    help="image sizes (default: the model's trained sizes, else its default size)")
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts, evenly spaced (default 8)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per prompt (default 2)")
    ap.add_argument("--taca", type=float, default=1.2, metavar="GAMMA", help="TACA's gamma, on every step (default 1.2)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "probe-sizes", help="folder for the CSV and the figure")
    ap.add_argument("--dry-run", action="store_true", help="print the table, leave RESULTS.md alone")
    args = ap.parse_args(argv)
    if args.prompts < 1 or args.seeds < 1:
        ap.error("--prompts and --seeds must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = time.perf_counter()
    pipe = load(args.model or str(default_model()))
    sizes = args.sizes or list(pipe.defaults.trained_sizes) or [default_size(pipe)]
    prompts = spread(heldout_prompts(), args.prompts)
    results = measure(pipe, sizes, prompts, range(args.seeds), args.taca, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.out / "probe_sizes.csv", args.out / "probe_sizes.png"
    write_csv(results, args.taca, csv_path)
    write_atomic(png_path, lambda tmp: figure(results, args.taca).save(tmp, format="PNG"))
    minutes = (time.perf_counter() - start) / 60
    text = (
        f"{SECTION}\n\n"
        f"The model {'assets/tiny-flux' if args.model is None else args.model}: {len(prompts)} held-out prompts of "
        f"scripts/scenes.py x {args.seeds} seed(s) per size, {pipe.defaults.steps if args.steps is None else args.steps} "
        "steps. Per layer, the attention mass image queries put on the text keys (mmdit/probe.py), averaged over "
        f"image queries, heads, steps, prompts and seeds: plain attention, TACA at gamma {args.taca:g} on every step, "
        "and the uniform share L_txt / (L_txt + L_img) a uniform attention would give. Figure and CSV: "
        f"`{png_path.name}`, `{csv_path.name}` in `--out`.\n\n"
        f"{table(results)}\n\n"
        f"- Machine: {machine()}; torch {torch.__version__}, Python {sys.version.split()[0]}; {minutes:.1f} min in all\n"
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- Command: `python -m benchmarks.probe_sizes {' '.join(sys.argv[1:] if argv is None else argv)}`\n"
    )
    print(text)
    print(f"wrote {csv_path} and {png_path}")
    if not args.dry_run:
        write_section(text)


if __name__ == "__main__":
    main()
