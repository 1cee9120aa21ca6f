"""The TACA experiment in miniature, on a CPU: does a hotter image-to-text attention bind colors, shapes
and places better in the shipped tiny model (assets/tiny-flux)?

    python -m benchmarks.taca_toy [--model FOLDER] [--size WxH] [--seeds 4] [--gammas 1.1 1.2 1.3 1.5]
                                  [--untils 0.97 0.9 0.5] [--lora-steps 300] [--work runs/taca-toy]

1. Writes the training scenes (scripts/scenes.py) at the chosen size and trains a TACA LoRA on them with
   the project's trainer, as the paper does: gamma 1.2 in the forward, t ~ U[0.97, 1] (rank 16 on the
   attention). `--lora-steps 0`: no LoRA, no LoRA rows.
2. Samples every held-out prompt (layouts never seen in training) with seeds 0..N-1 (the same initial
   noise for every setting) at `--size` (default: the model's), for gamma in `--gammas` and TACA on while
   t >= until, until in `--untils` (the tiny model's 20 unshifted steps: 0.97, 0.9, 0.5 are 1, 3 and 11
   steps with TACA), without and with the LoRA (on in the TACA steps only, as the authors use theirs).
3. Scores the images with benchmarks/compbench.py: per category the mean over the (prompt, seed) items
   with its 95% bootstrap interval, and the paired difference to the plain row (gamma 1, no LoRA: the
   same items) with its interval (benchmarks/stats.py); prints the table and writes it to the section
   "TACA in miniature (CPU)" of benchmarks/RESULTS.md ("TACA in miniature (CPU, 64x32)" at a size other
   than the model's default; the other sections are kept).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import convert
from benchmarks.compbench import CATEGORIES, default_size, load, score_items
from benchmarks.results import machine, write_section
from benchmarks.stats import RESAMPLES, Interval, category_intervals, paired_differences
from sampling import TacaSchedule, default_model
from sampling.cli import parse_size
from scripts.scenes import heldout_prompts, write_dataset
from training import TrainConfig, train
from training.data import target_size

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## TACA in miniature (CPU)"
GAMMAS = (1.0, 1.1, 1.2, 1.3, 1.5)
UNTILS = (0.97, 0.9, 0.5)


def training_shape(width: int, height: int) -> tuple[int, bool]:
    """(resolution, buckets) of TrainConfig that trains on width x height images as they are: a square is its
    side; otherwise aspect-ratio buckets of about the same area, whose bucket for this aspect must be the size."""
    if width == height:
        return width, False
    resolution = math.ceil(math.sqrt(width * height) / 16) * 16
    if target_size(width, height, resolution, True) != (height, width):
        raise ValueError(f"no aspect-ratio bucket of the trainer is {width}x{height}: train a LoRA at a square size "
                         "or pass --lora-steps 0")
    return resolution, True


def train_lora(model: str, work: Path, steps: int, seed: int, size: tuple[int, int]) -> Path:
    """The TACA LoRA of the paper's recipe, on the toy training scenes drawn at size (width, height); returns the
    LoRA file (kept in `work`, reused by a later run with the same size, steps and seed)."""
    width, height = size
    resolution, buckets = training_shape(width, height)
    here = work / f"{width}x{height}"
    data = here / f"scenes-{seed}" / "train"
    if not data.is_dir():
        write_dataset(data.parent, per_layout=2, per_object=10, seed=seed, width=width, height=height)
    out = here / f"lora-{steps}-{seed}"
    if (out / "lora.safetensors").is_file():
        return out / "lora.safetensors"
    cfg = TrainConfig(model=model, data=str(data), output=str(out), train="lora", resolution=resolution,
                      buckets=buckets, steps=steps, batch_size=32, rank=16, lr=1e-3, taca_gamma=1.2, t_min=0.97,
                      timesteps="window", dtype="float32", mixed_precision="no", device="cpu",
                      checkpoint_every=steps, seed=seed, progress=False)
    train(cfg)
    return out / "lora.safetensors"


def settings(gammas=GAMMAS, untils=UNTILS) -> list[tuple[float, float | None]]:
    """(gamma, until): plain attention once (until does not matter there), then every gamma x until."""
    return [(1.0, None)] + [(g, u) for g in gammas if g != 1.0 for u in untils]


def run(model: str, lora: Path | None, seeds: int, steps: int | None, size: tuple[int, int] | None = None,
        gammas=GAMMAS, untils=UNTILS) -> list[dict]:
    """One row per setting (the plain one first): gamma, until, lora, and per category its Interval (`means`)
    and its paired difference to the plain row (`diffs`, None in the plain row)."""
    prompts = heldout_prompts()
    rows, base = [], None
    for with_lora in (False, True) if lora else (False,):
        pipe = load(model)
        if with_lora:
            convert.load_lora(pipe.transformer, lora)
        for gamma, until in settings(gammas, untils):
            if with_lora and until is None:
                continue  # gamma 1: the gate keeps the LoRA off, the images are the plain ones
            taca = None if until is None else TacaSchedule(gamma, until)
            t0 = time.perf_counter()
            items = score_items(pipe, prompts, range(seeds), steps, taca, size)
            base = items if base is None else base
            diffs = None if items is base else paired_differences(base, items, CATEGORIES)
            rows.append({"gamma": gamma, "until": until, "lora": with_lora, "n": len(items),
                         "means": category_intervals(items, CATEGORIES), "diffs": diffs})
            print(format_row(rows[-1]) + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def format_diff(d: Interval) -> str:
    """A paired difference; `*` when its 95% interval excludes 0."""
    return d.signed() + (" *" if d.excludes_zero() else "")


def format_row(r: dict) -> str:
    until = "-" if r["until"] is None else f"{r['until']:g}"
    diffs = ["-"] * len(CATEGORIES) if r["diffs"] is None else [format_diff(r["diffs"][c]) for c in CATEGORIES]
    cells = [f"{r['gamma']:g}", until, "yes" if r["lora"] else "no", *(str(r["means"][c]) for c in CATEGORIES), *diffs]
    return "| " + " | ".join(cells) + " |"


def section(size: tuple[int, int], default: tuple[int, int]) -> str:
    """The RESULTS.md heading: SECTION at the model's default size, "## TACA in miniature (CPU, 64x32)" at
    another (so runs at several sizes keep their own sections)."""
    return SECTION if size == default else f"{SECTION[:-1]}, {size[0]}x{size[1]})"


def describe(r: dict) -> str:
    if r["until"] is None:
        return "plain attention"
    return f"gamma {r['gamma']:g} while t >= {r['until']:g}, LoRA {'yes' if r['lora'] else 'no'}"


def table(rows: list[dict]) -> str:
    cols = ["gamma", "TACA while t >=", "TACA LoRA", *CATEGORIES, *(f"{c} - plain" for c in CATEGORIES)]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "\n".join(format_row(r) for r in rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.taca_toy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: the shipped tiny model)")
    ap.add_argument("--size", type=parse_size, metavar="WxH", help="image size (default: the model's)")
    ap.add_argument("--seeds", type=int, default=4, help="images per prompt and setting (default 4)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the model's, 20)")
    ap.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS),
                    help=f"TACA temperatures (default {' '.join(map(str, GAMMAS))}; the plain row is always run)")
    ap.add_argument("--untils", type=float, nargs="+", default=list(UNTILS),
                    help=f"TACA while t >= each of these (default {' '.join(map(str, UNTILS))})")
    ap.add_argument("--lora-steps", type=int, default=300, help="TACA LoRA training steps (default 300; 0: no LoRA rows)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the LoRA's data and training")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "taca-toy", help="scenes and the LoRA")
    ap.add_argument("--dry-run", action="store_true", help="print the table, leave RESULTS.md alone")
    args = ap.parse_args(argv)
    if args.lora_steps < 0 or args.seeds < 1:
        ap.error("--lora-steps must be >= 0 and --seeds >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = time.perf_counter()
    model = args.model or str(default_model())
    default = default_size(load(model))
    width, height = size = args.size or default
    lora = None
    if args.lora_steps:
        lora = train_lora(model, args.work, args.lora_steps, args.seed, size)
        print(f"TACA LoRA: {lora} ({time.perf_counter() - start:.0f} s)")
    print(table([]).rstrip("\n"))
    rows = run(model, lora, args.seeds, args.steps, size, args.gammas, args.untils)
    minutes = (time.perf_counter() - start) / 60
    n = len(heldout_prompts())
    base = rows[0]["means"]["all"]
    best = max(rows, key=lambda r: r["means"]["all"].mean)
    lora_text = (f"TACA LoRA: rank 16 on the attention, {args.lora_steps} steps at gamma 1.2 on t in [0.97, 1] (the "
                 f"paper's recipe), trained on scenes drawn at {width}x{height}, on in the TACA steps only."
                 if lora else "No TACA LoRA (`--lora-steps 0`).")
    text = (
        f"{section(size, default)}\n\n"
        f"The model {'assets/tiny-flux' if args.model is None else args.model} at {width}x{height} on the {n} "
        f"held-out prompts of scripts/scenes.py (layouts never seen in training), {args.seeds} seed(s) each "
        f"({n * args.seeds} images per row, the same initial noise in every row), scored by "
        "benchmarks/compbench.py (T2I-CompBench's categories): each cell is the mean over the (prompt, seed) "
        "items with its 95% percentile bootstrap interval; `X - plain` is the paired difference to the plain "
        "row (gamma 1, no LoRA) over the same items with its interval, `*` where that interval excludes 0 "
        f"(benchmarks/stats.py, {RESAMPLES} resamples). {lora_text}\n\n"
        f"{table(rows)}\n\n"
        f"- Plain attention: all {base}; best row: {describe(best)}: all {best['means']['all']}. One image is worth "
        f"{1 / (n * args.seeds):.4f} of a score.\n"
        f"- Machine: {machine()}; torch {torch.__version__}, Python {sys.version.split()[0]}; "
        f"{minutes:.1f} min in all\n"
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- Command: `python -m benchmarks.taca_toy {' '.join(sys.argv[1:] if argv is None else argv)}`\n"
    )
    print(text)
    if not args.dry_run:
        write_section(text)


if __name__ == "__main__":
    main()
