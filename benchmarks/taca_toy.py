"""The TACA experiment in miniature, on a CPU: does a hotter image-to-text attention bind colors, shapes
and places better in the shipped tiny model (assets/tiny-flux)?

    python -m benchmarks.taca_toy [--seeds 4] [--lora-steps 300] [--work runs/taca-toy]

1. Writes the training scenes (scripts/scenes.py) and trains a TACA LoRA on them with the project's
   trainer, as the paper does: gamma 1.2 in the forward, t ~ U[0.97, 1] (rank 16 on the attention).
2. Samples every held-out prompt (layouts never seen in training) with seeds 0..N-1 (the same initial
   noise for every setting), for gamma in {1.0, 1.1, 1.2, 1.3, 1.5} and TACA on while t >= until, until
   in {0.97, 0.9, 0.5} (the tiny model's 20 unshifted steps: 1, 3 and 11 steps with TACA), without and
   with the LoRA (on in the TACA steps only, as the authors use theirs).
3. Scores the images with benchmarks/compbench.py, prints the table and writes it to the section
   "TACA in miniature (CPU)" of benchmarks/RESULTS.md (the other sections are kept).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import convert
from benchmarks.compbench import CATEGORIES, evaluate
from benchmarks.results import machine, write_section
from sampling import TacaSchedule, load_pipeline
from sampling import default_model
from training import TrainConfig, train
from scripts.scenes import heldout_prompts, write_dataset

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## TACA in miniature (CPU)"
GAMMAS = (1.0, 1.1, 1.2, 1.3, 1.5)
UNTILS = (0.97, 0.9, 0.5)


def train_lora(model: str, work: Path, steps: int, seed: int) -> Path:
    """The TACA LoRA of the paper's recipe, on the toy training scenes; returns the LoRA file."""
    data = work / "scenes" / "train"
    if not data.is_dir():
        write_dataset(work / "scenes", per_layout=2, per_object=10, seed=seed)
    out = work / "lora"
    if (out / "lora.safetensors").is_file():
        return out / "lora.safetensors"
    cfg = TrainConfig(model=model, data=str(data), output=str(out), train="lora", resolution=32, steps=steps,
                      batch_size=32, rank=16, lr=1e-3, taca_gamma=1.2, t_min=0.97, timesteps="window",
                      dtype="float32", mixed_precision="no", device="cpu", checkpoint_every=steps, seed=seed,
                      progress=False)
    train(cfg)
    return out / "lora.safetensors"


def settings() -> list[tuple[float, float | None]]:
    """(gamma, until): plain attention once (until does not matter there), then every gamma x until."""
    return [(1.0, None)] + [(g, u) for g in GAMMAS if g != 1.0 for u in UNTILS]


def run(model: str, lora: Path, seeds: int, steps: int | None) -> list[dict]:
    prompts = heldout_prompts()
    rows = []
    for with_lora in (False, True):
        pipe = load_pipeline(model, dtype=torch.float32)
        if with_lora:
            convert.load_lora(pipe.transformer, lora)
        for gamma, until in settings():
            if with_lora and until is None:
                continue  # gamma 1: the gate keeps the LoRA off, the images are the plain ones
            taca = None if until is None else TacaSchedule(gamma, until)
            t0 = time.perf_counter()
            scores = evaluate(pipe, prompts, range(seeds), steps, taca)
            rows.append({"gamma": gamma, "until": until, "lora": with_lora, **scores})
            print(format_row(rows[-1]) + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def format_row(r: dict) -> str:
    until = "-" if r["until"] is None else f"{r['until']:g}"
    cells = [f"{r['gamma']:g}", until, "yes" if r["lora"] else "no", *(f"{r[c]:.3f}" for c in CATEGORIES)]
    return "| " + " | ".join(cells) + " |"


def table(rows: list[dict]) -> str:
    head = "| gamma | TACA while t >= | TACA LoRA | color | shape | spatial | all |\n|---|---|---|---|---|---|---|\n"
    return head + "\n".join(format_row(r) for r in rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.taca_toy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: the shipped tiny model)")
    ap.add_argument("--seeds", type=int, default=4, help="images per prompt and setting (default 4)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the model's, 20)")
    ap.add_argument("--lora-steps", type=int, default=300, help="TACA LoRA training steps (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the LoRA's data and training")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "taca-toy", help="scenes and the LoRA")
    ap.add_argument("--dry-run", action="store_true", help="print the table, leave RESULTS.md alone")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = time.perf_counter()
    model = args.model or default_model()
    lora = train_lora(model, args.work, args.lora_steps, args.seed)
    print(f"TACA LoRA: {lora} ({time.perf_counter() - start:.0f} s)")
    print(table([]).rstrip("\n"))
    rows = run(model, lora, args.seeds, args.steps)
    minutes = (time.perf_counter() - start) / 60
    n = len(heldout_prompts())
    base = rows[0]["all"]
    best = max(rows, key=lambda r: r["all"])
    text = (
        f"{SECTION}\n\n"
        f"The tiny model (assets/tiny-flux) on the {n} held-out prompts of scripts/scenes.py (layouts never "
        f"seen in training), {args.seeds} seeds each ({n * args.seeds} images per row, the same initial noise "
        "in every row), scored by benchmarks/compbench.py (T2I-CompBench's categories: mean per prompt). "
        f"TACA LoRA: rank 16 on the attention, {args.lora_steps} steps at gamma 1.2 on t in [0.97, 1] "
        "(the paper's recipe), on in the TACA steps only.\n\n"
        f"{table(rows)}\n\n"
        f"- Plain attention: all {base:.3f}; best row: gamma {best['gamma']:g}, TACA while t >= {best['until']}, "
        f"LoRA {'yes' if best['lora'] else 'no'}: all {best['all']:.3f}. One image is worth "
        f"{1 / (n * args.seeds):.4f} of a score: differences of a few hundredths are noise.\n"
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
