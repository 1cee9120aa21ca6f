"""`mmdit sample` and `mmdit probe` (also `python -m sampling`): one set of sampling flags, two outputs.

Both subcommands take the same flags for the run (`add_run_arguments`), turned into a loaded pipeline
and `generate`'s keyword arguments in one place (`load_run`):
- `mmdit sample PROMPT` writes a PNG whose text chunks hold every setting used (prompt, model, variant,
  steps, guidance, seed, taca, size, version; negative prompt, true CFG, skip-layer guidance, LoRAs,
  FLUX.2's reference images and the display upscale when used), so an image can be made again;
- `mmdit probe PROMPT` runs the same sampling without decoding, records per step and layer the
  attention mass image queries give to text keys, and writes it as a CSV and a heat map
  (sampling/probe.py).
Without --model both use the tiny model shipped with the repo (assets/tiny-flux: 32x32 scenes of
colored shapes, shown 8x enlarged), offline. Steps, guidance and size default to the model's own
(`sampling.pipeline.DEFAULTS`). The `mmdit` command (cli.py at the repository's top) adds `mmdit train`.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from convert.files import write_atomic
from mmdit.probe import probe_attention

from .loading import default_model, load_pipeline
from .lora import load_pipeline_lora
from .offload import OFFLOAD
from .pipeline import Pipeline
from .probe import heatmap, write_csv
from .taca import TacaSchedule

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
USER_ERRORS = (OSError, ValueError, RuntimeError)  # bad paths, files, settings, hub answers: one line, no traceback


def version() -> str:
    try:
        return package_version("taca-mmdit")
    except PackageNotFoundError:
        return "unknown"


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" -> (width, height)."""
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1024x768, got {text!r}") from None
    if w % 16 or h % 16 or w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"width and height must be positive multiples of 16, got {text!r}")
    return w, h


def add_run_arguments(p: argparse.ArgumentParser, seed: int | None) -> None:
    """The flags of a sampling run, the same for every subcommand; `seed` is the default seed (None: random)."""
    p.add_argument("prompt", help="the text to draw")
    p.add_argument("--model", help="Diffusers folder, official single file, or hub repo id (owner/name[/file.safetensors]) "
                   "(default: the tiny model shipped in assets/tiny-flux)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float,
                   help="FLUX-dev, FLUX.2-dev: distilled guidance; SD3, FLUX.2-klein base: CFG scale (default: the model's)")
    p.add_argument("--negative", help="negative prompt for the CFG of SD3 and FLUX.2-klein base, or FLUX's with "
                   "--true-cfg (default: none; SD3 and FLUX.2 use \"\")")
    p.add_argument("--true-cfg", type=float, default=1.0, help="FLUX: true CFG scale with --negative (default 1: off)")
    p.add_argument("--slg", type=int, nargs="+", metavar="LAYER",
                   help="SD3: skip-layer guidance, skipping these joint blocks (SD3.5 Medium: 7 8 9); needs CFG (default off)")
    p.add_argument("--slg-scale", type=float, default=2.8, help="skip-layer guidance scale (default 2.8)")
    p.add_argument("--slg-start", type=float, default=0.01,
                   help="SLG applies in step i of N when N * start < i < N * stop (default 0.01)")
    p.add_argument("--slg-stop", type=float, default=0.2, help="see --slg-start (default 0.2)")
    p.add_argument("--seed", type=int, default=seed,
                   help="default: a random seed, written to the PNG" if seed is None else f"default {seed}")
    p.add_argument("--taca", type=float, metavar="GAMMA", help="TACA: image-to-text logits x GAMMA (paper: 1.2; default off)")
    p.add_argument("--taca-until", type=float, default=0.97, metavar="T",
                   help="TACA is on while the noise level t >= T (default 0.97, the paper's; 0: every step)")
    p.add_argument("--lora", type=Path, action="append", default=[], metavar="FILE",
                   help="a LoRA to apply, text-encoder weights included (repeatable; default none); with --taca "
                        "the transformer part is on only in the TACA steps")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of every --lora (default 1.0)")
    p.add_argument("--image", type=Path, action="append", default=[], metavar="FILE",
                   help="FLUX.2: a reference image to edit or compose from (repeatable; default none); the output "
                        "takes the first one's size unless --size is given")
    p.add_argument("--size", type=parse_size, metavar="WxH", help="default: the model's (1024x1024; the tiny model 32x32)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--offload", choices=[m for m in OFFLOAD if m],
                   help="parts kept on the CPU, on the GPU only while they run: the text encoders (whole, or "
                        "streamed block by block), every part (model), or every part streamed (least memory) "
                        "(default: none, every part on the device)")
    p.add_argument("--offload-encoders", action="store_true", help="the same as --offload encoders (default off)")


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="text to image", description="Generate an image from a prompt.")
    add_run_arguments(p, seed=None)
    p.add_argument("--upscale", type=int, metavar="N",
                   help="enlarge the PNG N times, nearest-neighbour (default: the model's; the tiny model 8)")
    p.add_argument("-o", "--output", default="out.png", type=Path, help="the PNG to write (default out.png)")
    p.set_defaults(func=sample)


def add_probe(sub) -> None:
    p = sub.add_parser(
        "probe", help="attention mass of image queries on text keys, per layer and step",
        description="Sample like `mmdit sample` and record, per step and layer, the share of attention that image "
        "queries give to text keys (with TACA applied). Writes OUTPUT (CSV) and OUTPUT with .png (heat map).",
    )
    add_run_arguments(p, seed=0)
    p.add_argument("-o", "--output", default="probe.csv", type=Path,
                   help="the CSV to write; the heat map goes beside it with .png (default probe.csv)")
    p.set_defaults(func=probe)


def load_run(args: argparse.Namespace) -> tuple[Pipeline, dict]:
    """The pipeline the flags name (with their LoRAs) and `generate`'s keyword arguments: the flags, else
    the model's defaults (steps, guidance, size), every one resolved so that it can be written down."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    pipe = load_pipeline(args.model or default_model(), device=device, dtype=dtype, offload=args.offload,
                         offload_encoders=args.offload_encoders)
    for file in args.lora:
        load_pipeline_lora(pipe, file, scale=args.lora_scale)
    images = [Image.open(f) for f in args.image]  # FLUX.2's reference images (editing)
    width, height = args.size or (pipe.defaults.size, pipe.defaults.size)
    if images and args.size is None and pipe.family == "flux2":
        width, height = pipe.reference_size(images[0])
    settings = dict(
        height=height, width=width,
        steps=pipe.defaults.steps if args.steps is None else args.steps,
        guidance=pipe.defaults.guidance if args.guidance is None else args.guidance,
        seed=random.randrange(2**32) if args.seed is None else args.seed,
        negative_prompt=args.negative, true_cfg=args.true_cfg,
        temperature=None if args.taca is None else TacaSchedule(args.taca, args.taca_until),
        skip_guidance_layers=args.slg, skip_layer_guidance_scale=args.slg_scale,
        skip_layer_guidance_start=args.slg_start, skip_layer_guidance_stop=args.slg_stop,
        images=images or None,
    )
    return pipe, settings


def png_text(args: argparse.Namespace, pipe: Pipeline, settings: dict) -> dict[str, str]:
    """Every setting of the run, for the PNG's text chunks; the optional ones only when used."""
    taca = settings["temperature"]
    text = {
        "prompt": args.prompt, "model": pipe.name, "variant": pipe.variant, "steps": settings["steps"],
        "guidance": settings["guidance"] if pipe.guidance_applies else "none (step-distilled)",
        "seed": settings["seed"],
        "taca": f"gamma={taca.gamma} until t={taca.until}" if taca else "off",
        "size": f"{settings['width']}x{settings['height']}", "version": f"taca-mmdit {version()}",
    }
    if args.negative is not None:
        text["negative"] = args.negative
    if args.true_cfg > 1:
        text["true_cfg"] = args.true_cfg
    if args.slg is not None:
        layers = " ".join(map(str, args.slg))
        text["slg"] = f"layers {layers} scale={args.slg_scale} start={args.slg_start} stop={args.slg_stop}"
    if args.lora:
        text["lora"] = ", ".join(f"{f.name} x{args.lora_scale}" for f in args.lora)
    if args.image:
        text["images"] = ", ".join(f.name for f in args.image)
    return {k: str(v) for k, v in text.items()}


def write_png(image: Image.Image, path: Path, text: dict[str, str]) -> None:
    """The PNG with `text` as its text chunks, written atomically."""
    png = PngInfo()
    for k, v in text.items():
        png.add_text(k, v)
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png))


def sample(args: argparse.Namespace) -> int:
    pipe, settings = load_run(args)
    (image,) = pipe.generate([args.prompt], progress=True, **settings)
    text = png_text(args, pipe, settings)
    width, height = settings["width"], settings["height"]
    upscale = pipe.defaults.upscale if args.upscale is None else args.upscale
    if upscale > 1:
        text["upscale"] = f"x{upscale} nearest"
        image = image.resize((width * upscale, height * upscale), Image.Resampling.NEAREST)
    write_png(image, args.output, text)
    shown = f", shown x{upscale}" if upscale > 1 else ""
    print(f"wrote {args.output} ({width}x{height}{shown}, {pipe.variant}, {settings['steps']} steps, seed {settings['seed']})")
    return 0


def probe(args: argparse.Namespace) -> int:
    pipe, settings = load_run(args)
    with probe_attention(pipe.transformer) as result:
        pipe.generate([args.prompt], output="latent", progress=True, **settings)
    write_csv(result, args.output)
    text = png_text(args, pipe, settings)
    title = f"text mass of image queries: {pipe.variant}, {text['size']}, taca {text['taca']}"
    heat = args.output.with_suffix(".png")
    write_png(heatmap(result, title), heat, text)
    print(f"wrote {args.output} ({len(result.records)} rows: {result.step + 1} model calls x {len(result.layers())} "
          f"layers) and {heat}")
    return 0


def main(argv: list[str] | None = None, more: Sequence[Callable] = ()) -> int:
    """Parse and run one subcommand: sample, probe and those `more` adds (cli.py adds `train`)."""
    parser = argparse.ArgumentParser(prog="mmdit", description="MM-DiT (FLUX.1, SD3/SD3.5) with TACA")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_sample, add_probe, *more):
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"mmdit {args.command}: error: {e}", file=sys.stderr)
        return 2
