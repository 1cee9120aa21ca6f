"""`mmdit sample` and `mmdit probe` (also `python -m sampling`): one set of sampling flags, two outputs.

Both subcommands take the same flags for the run (`add_run_arguments`), turned into a loaded pipeline
and `generate`'s keyword arguments in one place (`load_run`):
- `mmdit sample PROMPT` writes a PNG whose text chunks hold every setting used (prompt, model, variant,
  steps, guidance, seed, taca, size, version; negative prompt, true CFG, skip-layer guidance, LoRAs,
  FLUX.2's reference images and the display upscale when used), so an image can be made again;
  `mmdit sample --prompts FILE --outdir DIR` writes one such PNG per (prompt, seed) and a manifest, on one
  process or many under torchrun, resuming where a run stopped (sampling/batch.py);
- `mmdit probe PROMPT` runs the same sampling, records per step and layer the attention mass image
  queries give to text keys, and writes it as a CSV and a heat map (sampling/probe.py), with the image
  drawn beside them.
Without --model both use the tiny model shipped with the repo (assets/tiny-flux: 32x32 scenes of
colored shapes, shown 8x enlarged), offline. Steps, guidance, size and FLUX's true CFG default to the
model's own (`sampling.pipeline.DEFAULTS`, or its folder's `sampling_defaults`: `Defaults`). The `mmdit`
command (cli.py at the repository's top) adds `mmdit train`.

Nothing runs on a value that cannot work: each flag is checked at parse time (finite, in range:
sampling/limits.py), flags against each other and the output path before the model is loaded
(`check_flags`, `check_output`), the size against the model before its weights are read. A flag that
would do nothing on the model (`--guidance` on a model without guidance, `--negative` without true CFG on
FLUX, ...) is a warning and is neither applied nor written to the output.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import torch
from PIL import Image

from convert.files import check_can_create, write_atomic
from mmdit.probe import probe_attention

from .batch import Processes, Run, sample_items
from .limits import MAX_PNG_PIXELS, MAX_SEED, MAX_SIDE, MAX_STEPS, SizeError
from .loading import default_model, load_pipeline
from .lora import load_pipeline_lora
from .offload import OFFLOAD
from .outdir import LAYOUTS, check_names, check_outdir, png_bytes
from .pipeline import Pipeline
from .probe import heatmap, write_csv
from .prompt_file import parse_seeds, read_prompts
from .sampler import NonFiniteError, slg_window
from .taca import TacaSchedule

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
USER_ERRORS = (OSError, ValueError, RuntimeError)  # bad paths, files, settings, hub answers: one line, no traceback
# `generate`'s guidance arguments and their flags (a flag that does nothing on the model is neither applied nor recorded)
GUIDANCE_FLAGS = {"guidance": "--guidance", "negative_prompt": "--negative", "true_cfg": "--true-cfg"}
UNSET = {"guidance": None, "negative_prompt": None, "true_cfg": 1.0}  # what generate gets for a flag that does nothing
# the values of flags left unset (None, so that a flag given can be told from its default): generate's and TacaSchedule's
FLAG_DEFAULTS = {"taca_until": TacaSchedule.until, "lora_scale": 1.0, "slg_scale": 2.8,
                 "slg_start": 0.01, "slg_stop": 0.2}
EPILOG = ("Every value is checked before any work: a bad one is one line on stderr and exit status 2; a flag that would "
          "do nothing on the model is a warning, and is neither applied nor written to the output. Exit status 1: "
          "the run produced NaN or Inf (the message names the step).")


def version() -> str:
    try:
        return package_version("taca-mmdit")
    except PackageNotFoundError:
        return "unknown"


# ---- flag values, checked at parse time (argparse names the flag in its error) ----


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" -> (width, height): positive multiples of 16, at most MAX_SIDE (sampling/limits.py)."""
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1024x768, got {text!r}") from None
    if w % 16 or h % 16 or w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"width and height must be positive multiples of 16, got {text!r}")
    if max(w, h) > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"width and height are at most {MAX_SIDE}, got {text!r}")
    return w, h


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        if high is not None and n > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {n}")
        return n
    return parse


def number(low: float | None = None, high: float | None = None, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number, at least `low` (above it if `above`), at most `high`."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (x <= low if above else x < low):
            raise argparse.ArgumentTypeError(f"must be {'above' if above else 'at least'} {low:g}, got {text!r}")
        if high is not None and x > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}, got {text!r}")
        return x
    return parse


def parse_device(text: str) -> str:
    """A device torch knows and this machine has: cpu, cuda[:N], mps, ..."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cpu":
        return text
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available"):
        raise argparse.ArgumentTypeError(f"{text!r}: not a device to sample on (e.g. cpu, cuda, cuda:1, mps)")
    if not backend.is_available():
        why = ("this PyTorch is a CPU-only build" if device.type == "cuda" and torch.version.cuda is None
               else f"PyTorch finds no {device.type} device here")
        raise argparse.ArgumentTypeError(f"{text!r} is not available: {why}; use --device cpu")
    count = getattr(backend, "device_count", lambda: None)()
    if device.index is not None and count is not None and device.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: there is no {device.type} device {device.index} ({count} found)")
    return text


def add_run_arguments(p: argparse.ArgumentParser, seed: int | None, prompt_file: bool = False) -> None:
    """The flags of a sampling run, the same for every subcommand; `seed` is the default seed (None: random);
    `prompt_file`: the prompt may be left out for --prompts."""
    p.add_argument("prompt", nargs="?" if prompt_file else None, help="the text to draw"
                   + (" (or --prompts FILE)" if prompt_file else ""))
    p.add_argument("--model", help="Diffusers folder, official single file, or hub repo id (owner/name[/file.safetensors]) "
                   "(default: the tiny model shipped in assets/tiny-flux)")
    p.add_argument("--steps", type=integer(1, MAX_STEPS), help=f"sampling steps, 1 to {MAX_STEPS} (default: the model's)")
    p.add_argument("--guidance", type=number(0), help="FLUX-dev, FLUX.2-dev: distilled guidance; SD3, FLUX.2-klein base: CFG scale (default: the model's)")
    p.add_argument("--negative", help="negative prompt for the CFG of SD3 and FLUX.2-klein base, or FLUX's true CFG "
                   "(default: none, or the model's own with its true CFG; SD3 and FLUX.2 use \"\")")
    p.add_argument("--true-cfg", type=number(1),
                   help="FLUX: true CFG scale, with --negative or the model's own negative prompt "
                        "(default: the model's, 1 = off)")
    p.add_argument("--slg", type=integer(0), nargs="+", metavar="LAYER",
                   help="SD3: skip-layer guidance, skipping these joint blocks (SD3.5 Medium: 7 8 9); needs CFG (default off)")
    p.add_argument("--slg-scale", type=number(0),
                   help=f"skip-layer guidance scale (default {FLAG_DEFAULTS['slg_scale']})")
    p.add_argument("--slg-start", type=number(0, 1),
                   help="SLG applies in step i of N when N * start < i < N * stop "
                        f"(default {FLAG_DEFAULTS['slg_start']})")
    p.add_argument("--slg-stop", type=number(0, 1), help=f"see --slg-start (default {FLAG_DEFAULTS['slg_stop']})")
    p.add_argument("--seed", type=integer(0, MAX_SEED), default=seed,
                   help="0 to 2**64 - 1 (default: a random seed, written to the PNG)" if seed is None
                   else f"0 to 2**64 - 1 (default {seed})")
    p.add_argument("--taca", type=number(0, above=True), metavar="GAMMA",
                   help="TACA: image-to-text logits x GAMMA, above 0 (paper: 1.2; default off)")
    p.add_argument("--taca-until", type=number(0, 1), metavar="T",
                   help="with --taca: TACA is on while the noise level t >= T, 0 to 1 "
                        f"(default {FLAG_DEFAULTS['taca_until']}, the paper's; 0: every step)")
    p.add_argument("--lora", type=Path, action="append", default=[], metavar="FILE",
                   help="a LoRA to apply, text-encoder weights included (repeatable; default none); with --taca "
                        "the transformer part is on only in the TACA steps")
    p.add_argument("--lora-scale", type=number(),
                   help=f"strength of every --lora (default {FLAG_DEFAULTS['lora_scale']})")
    p.add_argument("--image", type=Path, action="append", default=[], metavar="FILE",
                   help="FLUX.2: a reference image to edit or compose from (repeatable; default none); the output "
                        "takes the first one's size unless --size is given")
    p.add_argument("--size", type=parse_size, metavar="WxH",
                   help=f"multiples of 16, at most {MAX_SIDE} and what the model allows (SD3: its position table) "
                        "(default: the model's, 1024x1024; the tiny model 32x32)")
    p.add_argument("--device", type=parse_device, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--offload", choices=[m for m in OFFLOAD if m],
                   help="parts kept on the CPU, on the GPU only while they run: the text encoders (whole, or "
                        "streamed block by block), every part (model), or every part streamed (least memory) "
                        "(default: none, every part on the device)")
    p.add_argument("--offload-encoders", action="store_true", help="the same as --offload encoders (default off)")


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="text to image", description="Generate an image from a prompt.", epilog=EPILOG)
    add_run_arguments(p, seed=None, prompt_file=True)
    p.add_argument("--upscale", type=integer(1), metavar="N",
                   help=f"enlarge the PNG N times, nearest-neighbour, up to {MAX_PNG_PIXELS} pixels in all "
                        "(default: the model's; the tiny model 8)")
    p.add_argument("-o", "--output", default="out.png", type=Path,
                   help="the PNG to write, a .png name, or an existing FIFO or device such as /dev/stdout, "
                        "written through (default out.png)")
    many = p.add_argument_group("a prompt file: one PNG per (prompt, seed), on one process or many (torchrun)")
    many.add_argument("--prompts", type=Path, metavar="FILE",
                      help="one prompt a line (blank lines and # comments skipped), or JSONL (*.jsonl): "
                           '{"prompt": ..., "negative": ..., "seed": ...} a line; instead of PROMPT (default: none)')
    many.add_argument("--outdir", type=Path, metavar="DIR",
                      help="where the PNGs and manifest.jsonl go; the same command again resumes there (no default: "
                           "needed with --prompts)")
    many.add_argument("--seeds", type=parse_seeds, nargs="+", metavar="SEED",
                      help="seeds of every prompt: numbers and ranges, e.g. 0 1 2 3 or 0-3 (default 0)")
    many.add_argument("--batch-size", type=integer(1), metavar="N", help="images per model call (default 1)")
    many.add_argument("--layout", choices=LAYOUTS,
                      help="file names: index, DIR/000000.png; t2i-compbench, DIR/samples/{prompt}_{index:06d}.png "
                           "as the T2I-CompBench evaluation scripts read them (default index)")
    p.set_defaults(func=sample)


def add_probe(sub) -> None:
    p = sub.add_parser(
        "probe", help="attention mass of image queries on text keys, per layer and step",
        description="Sample like `mmdit sample` and record, per step and layer, the share of attention that image "
        "queries give to text keys (with TACA applied). Writes OUTPUT (CSV), OUTPUT with .png (heat map) and "
        "OUTPUT with -image.png (the image drawn).",
        epilog=EPILOG,
    )
    add_run_arguments(p, seed=None)
    p.add_argument("-o", "--output", default="probe.csv", type=Path,
                   help="the CSV to write, a .csv name; the heat map goes beside it with .png, the image with "
                        "-image.png (default probe.csv)")
    p.set_defaults(func=probe)


# ---- checks that need more than one flag, or the file system: before any work ----


# flags that mean something only beside another
PROMPT_FILE_FLAGS = ("--outdir", "--seeds", "--batch-size", "--layout")  # beside --prompts
NEEDS = {"--taca-until": "--taca", "--lora-scale": "--lora", "--slg-scale": "--slg", "--slg-start": "--slg",
         "--slg-stop": "--slg"}


def dest(flag: str) -> str:
    """The attribute argparse stores a flag in: --taca-until -> taca_until."""
    return flag.removeprefix("--").replace("-", "_")


def warn(args: argparse.Namespace, message: str) -> None:
    print(f"mmdit {args.command}: warning: {message}", file=sys.stderr)


def check_flags(args: argparse.Namespace) -> None:
    """Flags that contradict each other are an error; flags that would do nothing are a warning (and unset)."""
    if getattr(args, "prompts", None) is not None:
        check_prompt_file_flags(args)
    elif args.prompt is None:
        raise ValueError("give a PROMPT, or --prompts FILE --outdir DIR")
    if args.slg_start is not None and args.slg_stop is not None and args.slg_start >= args.slg_stop:
        raise ValueError(f"--slg-start {args.slg_start} must be below --slg-stop {args.slg_stop}")
    if getattr(args, "upscale", None) is not None:  # mmdit sample; without --size, the smallest image bounds it
        check_upscale(*(args.size or (16, 16)), args.upscale, smallest=args.size is None)
    if args.offload_encoders and args.offload not in (None, "encoders"):
        warn(args, f"--offload-encoders does nothing with --offload {args.offload}: ignored")
        args.offload_encoders = False
    if getattr(args, "prompts", None) is None:
        for flag in PROMPT_FILE_FLAGS if hasattr(args, "prompts") else ():
            if getattr(args, dest(flag)) is not None:
                warn(args, f"{flag} does nothing without --prompts: ignored")
    for flag, other in NEEDS.items():
        if getattr(args, dest(flag)) is not None and not getattr(args, dest(other)):
            warn(args, f"{flag} does nothing without {other}: ignored")
            setattr(args, dest(flag), None)


def check_prompt_file_flags(args: argparse.Namespace) -> None:
    """--prompts: a PROMPT or --seed beside it is an error, --outdir is needed; the defaults filled in."""
    if args.prompt is not None:
        raise ValueError(f"give a PROMPT or --prompts {args.prompts}, not both")
    if args.seed is not None:
        raise ValueError("--seed is for one PROMPT; with --prompts give --seeds (e.g. --seeds 0-3)")
    if args.outdir is None:
        raise ValueError(f"--prompts {args.prompts}: name the folder for the images, --outdir DIR")
    args.seeds = [s for group in args.seeds or [[0]] for s in group]
    repeated = next((s for i, s in enumerate(args.seeds) if s in args.seeds[:i]), None)
    if repeated is not None:
        raise ValueError(f"--seeds: seed {repeated} is given twice")
    args.batch_size = args.batch_size or 1
    args.layout = args.layout or "index"


def check_upscale(width: int, height: int, upscale: int, smallest: bool = False) -> None:
    """Refuse an enlarged PNG over MAX_PNG_PIXELS; `smallest`: the size is the smallest possible, 16x16."""
    if width * height * upscale**2 > MAX_PNG_PIXELS:
        what = "even a 16x16 image would be a" if smallest else "a"
        raise SizeError(f"--upscale {upscale}: {what} {width * upscale}x{height * upscale} PNG, over {MAX_PNG_PIXELS} "
                        "pixels, which PIL refuses to open safely (Image.MAX_IMAGE_PIXELS)")


def check_output(path: Path, suffix: str, through: bool) -> Path:
    """Refuse, before any work, an output that could not be written; returns the path. A name must end in
    `suffix` (the format written); an existing FIFO or device (/dev/stdout) is written through when
    `through`, else refused; the folder must exist or be creatable, and take a new file."""
    if path.exists() and not path.is_file():  # follows links
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a folder; name a file")
        if not through:
            raise ValueError(f"{path}: not a regular file; name a {suffix} file")
        return path
    target = Path(os.path.realpath(path)) if path.is_symlink() else path  # /dev/stdout > file.png: that file
    if target.suffix.lower() != suffix:
        raise ValueError(f"{path}: the output is written as {suffix[1:].upper()}: name it *{suffix}")
    if target.exists() and not os.access(target, os.W_OK):
        raise PermissionError(f"{path}: not writable")
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise NotADirectoryError(f"{path}: {blocker} is not a folder") from None
    except OSError as e:
        raise type(e)(f"{path}: cannot create the folder {folder}: {e.strerror}") from None
    check_can_create(folder, path)
    return path


def load_run(args: argparse.Namespace) -> tuple[Pipeline, dict]:
    """The pipeline the flags name (with their LoRAs) and `generate`'s keyword arguments: the flags, else
    the model's defaults (steps, guidance, size, FLUX's true CFG and its negative prompt), every one resolved
    so that it can be written down. A guidance flag that would do nothing on this model is warned of and
    left out (None)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    offload = args.offload or ("encoders" if args.offload_encoders else None)
    if offload and torch.device(device).type == "cpu":
        warn(args, f"--offload {offload} does nothing on the CPU (every part is there already): ignored")
        offload = None
    image_size = None if args.size is None else args.size[::-1]  # (height, width)
    pipe = load_pipeline(args.model or default_model(), device=device, dtype=dtype, offload=offload,
                         image_size=image_size)
    images = [Image.open(f) for f in args.image]  # FLUX.2's reference images (editing)
    if images and pipe.family != "flux2":
        raise ValueError(f"--image: reference images are for FLUX.2 models; this is a {pipe.family} model")
    width, height = args.size or (pipe.defaults.size, pipe.defaults.size)
    if images and args.size is None:  # the output takes the first reference's size, as Diffusers
        width, height = pipe.reference_size(images[0])
    if hasattr(args, "upscale"):  # mmdit sample
        args.upscale = pipe.defaults.upscale if args.upscale is None else args.upscale
        check_upscale(width, height, args.upscale)
    value = {name: default if getattr(args, name) is None else getattr(args, name)
             for name, default in FLAG_DEFAULTS.items()}
    for file in args.lora:
        load_pipeline_lora(pipe, file, scale=value["lora_scale"])
    steps = pipe.defaults.steps if args.steps is None else args.steps
    true_cfg, negative = pipe.true_cfg_for(args.true_cfg, args.negative)  # the flags, else the model's
    settings = dict(
        height=height, width=width, steps=steps,
        guidance=pipe.defaults.guidance if args.guidance is None else args.guidance,
        seed=random.randrange(2**32) if args.seed is None else args.seed,
        negative_prompt=negative, true_cfg=true_cfg,
        temperature=None if args.taca is None else TacaSchedule(args.taca, value["taca_until"]),
        skip_guidance_layers=args.slg, skip_layer_guidance_scale=value["slg_scale"],
        skip_layer_guidance_start=value["slg_start"], skip_layer_guidance_stop=value["slg_stop"],
        images=images or None,
    )
    for name, why in pipe.inert(settings["guidance"], settings["negative_prompt"], settings["true_cfg"]).items():
        flag = GUIDANCE_FLAGS[name]
        if getattr(args, dest(flag)) is not None:  # else the model's default guidance, which it does not take: silently
            warn(args, f"{flag} {getattr(args, dest(flag))!r} does nothing on {pipe.variant}: {why}; "
                       "not applied, not recorded")
        settings[name] = UNSET[name]
    if args.slg is not None and pipe.family == "sd3":
        f = pipe.autoencoder.params.downscale
        window = slg_window(pipe.sigmas(steps, height // f, width // f),
                            settings["skip_layer_guidance_start"], settings["skip_layer_guidance_stop"])
        if not window:
            warn(args, f"--slg does nothing in {steps} steps: no step i of them has N * start < i < N * stop "
                       "(--slg-start, --slg-stop); not applied, not recorded")
            settings["skip_guidance_layers"] = None
    return pipe, settings


def png_text(args: argparse.Namespace, pipe: Pipeline, settings: dict) -> dict[str, str]:
    """Every setting the run applied, for the PNG's text chunks; the optional ones only when used."""
    taca = settings["temperature"]
    text = {"prompt": args.prompt, "model": pipe.name, "variant": pipe.variant, "steps": settings["steps"]}
    if settings["guidance"] is not None:  # None: a model that takes no guidance scale
        text["guidance"] = settings["guidance"]
    text |= {
        "seed": settings["seed"], "taca": f"gamma={taca.gamma} until t={taca.until}" if taca else "off",
        "size": f"{settings['width']}x{settings['height']}", "version": f"taca-mmdit {version()}",
    }
    if settings["negative_prompt"] is not None:
        text["negative"] = settings["negative_prompt"]
    if settings["true_cfg"] > 1:
        text["true_cfg"] = settings["true_cfg"]
    if settings["skip_guidance_layers"] is not None:
        layers = " ".join(map(str, settings["skip_guidance_layers"]))
        text["slg"] = (f"layers {layers} scale={settings['skip_layer_guidance_scale']} "
                       f"start={settings['skip_layer_guidance_start']} stop={settings['skip_layer_guidance_stop']}")
    if args.lora:
        scale = FLAG_DEFAULTS["lora_scale"] if args.lora_scale is None else args.lora_scale
        text["lora"] = ", ".join(f"{f.name} x{scale}" for f in args.lora)
    if args.image:
        text["images"] = ", ".join(f.name for f in args.image)
    return {k: str(v) for k, v in text.items()}


def write_png(image: Image.Image, path: Path, text: dict[str, str]) -> None:
    """The PNG with `text` as its text chunks, written atomically (through, to a FIFO or a device: encoded
    in memory first, as PIL's PNG writer seeks)."""
    encoded = png_bytes(image, text)
    write_atomic(path, lambda name: Path(name).write_bytes(encoded))


def sample(args: argparse.Namespace) -> int:
    check_flags(args)
    if args.prompts is not None:
        return sample_prompt_file(args)
    check_output(args.output, ".png", through=True)
    pipe, settings = load_run(args)
    (image,) = pipe.generate([args.prompt], progress=True, **settings)
    text = png_text(args, pipe, settings)
    width, height, upscale = settings["width"], settings["height"], args.upscale
    if upscale > 1:
        text["upscale"] = f"x{upscale} nearest"
        image = image.resize((width * upscale, height * upscale), Image.Resampling.NEAREST)
    write_png(image, args.output, text)
    shown = f", shown x{upscale}" if upscale > 1 else ""
    report = sys.stdout if args.output.is_file() else sys.stderr  # not into the PNG written to /dev/stdout
    print(f"wrote {args.output} ({width}x{height}{shown}, {pipe.variant}, {settings['steps']} steps, "
          f"seed {settings['seed']})", file=report)
    return 0


def sample_prompt_file(args: argparse.Namespace) -> int:
    """`mmdit sample --prompts FILE --outdir DIR`: the file, the names and the folder checked before the model
    loads, then every (prompt, seed) drawn by sampling/batch.py (under torchrun: this process's share)."""
    items = read_prompts(args.prompts, args.seeds)
    check_names(args.layout, items, args.prompts)
    check_outdir(args.outdir)
    processes = Processes.from_env()
    args.device = processes.device(args.device)
    pipe, settings = load_run(args)
    text = png_text(args, pipe, settings)
    if args.upscale > 1:
        text["upscale"] = f"x{args.upscale} nearest"
    return sample_items(pipe, settings, text, items, args.prompts,
                        Run(args.outdir, args.layout, args.batch_size, args.upscale), processes)


def probe(args: argparse.Namespace) -> int:
    check_flags(args)
    heat, drawn = args.output.with_suffix(".png"), args.output.with_name(args.output.stem + "-image.png")
    check_output(args.output, ".csv", through=False)
    for png in (heat, drawn):
        check_output(png, ".png", through=False)
    pipe, settings = load_run(args)
    with probe_attention(pipe.transformer) as result:
        (image,) = pipe.generate([args.prompt], progress=True, **settings)  # the decoder is not probed
    write_csv(result, args.output)
    text = png_text(args, pipe, settings)
    title = f"text mass of image queries: {pipe.variant}, {text['size']}, seed {text['seed']}, taca {text['taca']}"
    write_png(heatmap(result, title), heat, text)
    up = pipe.defaults.upscale  # shown as `mmdit sample` shows it by default (the tiny model: 8x, nearest)
    if up > 1 and image.width * image.height * up**2 <= MAX_PNG_PIXELS:
        image = image.resize((image.width * up, image.height * up), Image.Resampling.NEAREST)
        text = text | {"upscale": f"x{up} nearest"}
    write_png(image, drawn, text)
    print(f"wrote {args.output} ({len(result.records)} rows: {result.step + 1} model calls x {len(result.layers())} "
          f"layers), {heat} and {drawn} (seed {settings['seed']})")
    return 0


def main(argv: list[str] | None = None, more: Sequence[Callable] = ()) -> int:
    """Parse and run one subcommand: sample, probe and those `more` adds (cli.py adds `train`).
    Exit status: 0 done; 1 the run produced NaN or Inf; 2 a bad value, file or setting (one line, no traceback)."""
    parser = argparse.ArgumentParser(prog="mmdit", description="MM-DiT (FLUX.1, SD3/SD3.5) with TACA")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_sample, add_probe, *more):
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NonFiniteError as e:
        print(f"mmdit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        message = f"--{e}" if isinstance(e, SizeError) and str(e).startswith("size ") else str(e)  # name the flag
        print(f"mmdit {args.command}: error: {message}", file=sys.stderr)
        return 2
