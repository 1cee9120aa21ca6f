"""The `mmdit` command (also `python -m sampling`): one subcommand per task, each a pair of functions.

A subcommand is `add_NAME(subparsers)`, which declares its arguments and sets `func`, and the
function it names, which takes the parsed arguments and returns the exit code. Adding one is adding
its `add_...` function to `COMMANDS`.

`mmdit sample PROMPT --model SOURCE` writes a PNG whose text chunks hold every setting used (prompt,
model, variant, steps, guidance, seed, taca, size, version; negative prompt, true CFG, skip-layer
guidance, LoRAs and the display upscale when used), so an image can be made again. Without --model it
samples the tiny model shipped with the repo (assets/tiny-flux: 32x32 scenes of colored shapes, shown
8x enlarged), offline.
Defaults (steps, guidance) are the model's own: see `sampling.pipeline.DEFAULTS`.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

from training.cli import add_train_parser

from .offload import OFFLOAD
from .probe import add_probe

# The tiny FLUX-architecture model trained on colored-shape scenes, shipped with the repo (assets/tiny-flux)
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-flux"


def default_model() -> str:
    """The model used when --model is omitted: the shipped tiny model."""
    if not (DEFAULT_MODEL / "model_index.json").is_file():
        sys.exit(f"mmdit: the default model is not at {DEFAULT_MODEL}: pass --model SOURCE (a Diffusers "
                 "folder, an official single file such as flux1-dev.safetensors, or a hub repo id such as "
                 "black-forest-labs/FLUX.1-dev)")
    return str(DEFAULT_MODEL)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v("taca-mmdit")
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


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="text to image", description="Generate an image from a prompt.")
    p.add_argument("prompt")
    p.add_argument("--model", help="Diffusers folder, official single file, or hub repo id (owner/name[/file.safetensors]); "
                   "default: the tiny model shipped in assets/tiny-flux")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="FLUX-dev: distilled guidance; SD3: CFG scale (default: the model's)")
    p.add_argument("--negative", help="negative prompt (SD3 CFG; FLUX with --true-cfg)")
    p.add_argument("--true-cfg", type=float, default=1.0, help="FLUX: true CFG scale with --negative (default off)")
    p.add_argument("--slg", type=int, nargs="+", metavar="LAYER",
                   help="SD3: skip-layer guidance, skipping these joint blocks (SD3.5 Medium: 7 8 9); needs CFG")
    p.add_argument("--slg-scale", type=float, default=2.8, help="skip-layer guidance scale (default 2.8)")
    p.add_argument("--slg-start", type=float, default=0.01,
                   help="SLG applies in step i of N when N * start < i < N * stop (default 0.01)")
    p.add_argument("--slg-stop", type=float, default=0.2, help="see --slg-start (default 0.2)")
    p.add_argument("--seed", type=int, help="default: a random seed, written to the PNG")
    p.add_argument("--taca", type=float, metavar="GAMMA", help="TACA: image-to-text logits x GAMMA (paper: 1.2)")
    p.add_argument("--taca-until", type=float, default=0.97, metavar="T",
                   help="TACA is on while the noise level t >= T (paper: 0.97; 0: every step)")
    p.add_argument("--lora", type=Path, action="append", default=[], metavar="FILE",
                   help="a LoRA to apply, text-encoder weights included (repeatable); with --taca the "
                        "transformer part is on only in the TACA steps")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of every --lora")
    p.add_argument("--size", type=parse_size, metavar="WxH", help="default: the model's (1024x1024; the tiny model 32x32)")
    p.add_argument("--upscale", type=int, metavar="N",
                   help="enlarge the PNG N times, nearest-neighbour (default: the model's; the tiny model 8)")
    p.add_argument("-o", "--output", default="out.png", type=Path)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--offload", choices=[m for m in OFFLOAD if m],
                   help="parts kept on the CPU, on the GPU only while they run: the text encoders (whole, or "
                        "streamed block by block), every part (model), or every part streamed (least memory)")
    p.add_argument("--offload-encoders", action="store_true", help="the same as --offload encoders")
    p.set_defaults(func=sample)


def sample(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from .loading import load_pipeline
    from .lora import load_pipeline_lora
    from .taca import TacaSchedule

    model = args.model or default_model()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")])
    pipe = load_pipeline(model, device=device, dtype=dtype, offload=args.offload, offload_encoders=args.offload_encoders)
    for file in args.lora:
        load_pipeline_lora(pipe, file, scale=args.lora_scale)
    steps = pipe.defaults.steps if args.steps is None else args.steps
    guidance = pipe.defaults.guidance if args.guidance is None else args.guidance
    seed = random.randrange(2**32) if args.seed is None else args.seed
    taca = None if args.taca is None else TacaSchedule(args.taca, args.taca_until)
    width, height = args.size or (pipe.defaults.size, pipe.defaults.size)
    upscale = pipe.defaults.upscale if args.upscale is None else args.upscale
    (image,) = pipe.generate(
        [args.prompt], height=height, width=width, steps=steps, guidance=guidance, seed=seed,
        negative_prompt=args.negative, true_cfg=args.true_cfg, temperature=taca, progress=True,
        skip_guidance_layers=args.slg, skip_layer_guidance_scale=args.slg_scale,
        skip_layer_guidance_start=args.slg_start, skip_layer_guidance_stop=args.slg_stop,
    )
    info = {
        "prompt": args.prompt, "model": model, "variant": pipe.variant, "steps": steps, "guidance": guidance,
        "seed": seed, "taca": f"gamma={taca.gamma} until t={taca.until}" if taca else "off",
        "size": f"{width}x{height}", "version": f"taca-mmdit {version()}",
    }
    if args.negative is not None:
        info["negative"] = args.negative
    if args.true_cfg > 1:
        info["true_cfg"] = args.true_cfg
    if args.slg is not None:
        layers = " ".join(map(str, args.slg))
        info["slg"] = f"layers {layers} scale={args.slg_scale} start={args.slg_start} stop={args.slg_stop}"
    if args.lora:
        info["lora"] = ", ".join(f"{f.name} x{args.lora_scale}" for f in args.lora)
    if upscale > 1:
        info["upscale"] = f"x{upscale} nearest"
        image = image.resize((width * upscale, height * upscale), Image.Resampling.NEAREST)
    png = PngInfo()
    for k, v in info.items():
        png.add_text(k, str(v))
    save_atomic(image, args.output, png)
    shown = f", shown x{upscale}" if upscale > 1 else ""
    print(f"wrote {args.output} ({width}x{height}{shown}, {pipe.variant}, {steps} steps, seed {seed})")
    return 0


def save_atomic(image, path: Path, pnginfo) -> None:
    """Write beside `path`, then rename: never a half-written image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=pnginfo)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


COMMANDS = [add_sample, add_probe, add_train_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdit", description="MM-DiT (FLUX.1, SD3/SD3.5) with TACA")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, RuntimeError) as e:  # bad paths, files, settings, hub answers: one line, no traceback
        print(f"mmdit {args.command}: error: {e}", file=sys.stderr)
        return 2
