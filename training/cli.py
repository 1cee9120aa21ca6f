"""`mmdit train` (also `python -m training`): train a TACA LoRA (or, `--train full`, every weight) from flags
and/or a TOML config.

Every flag is a field of `TrainConfig` (training/config.py); a flag given on the command line wins
over the TOML file, which wins over the defaults. Exit codes: 0 done, 1 stopped on a non-finite
loss, 2 bad settings, data or files, 130 interrupted by Ctrl-C (a checkpoint was written: rerun with --resume).
"""

from __future__ import annotations

import argparse
import logging
import sys

# field: (type, help); booleans become --flag / --no-flag
FLAGS: dict[str, tuple[type, str]] = {
    "model": (str, "model source, as for mmdit sample: Diffusers folder, official single file, or hub repo id"),
    "data": (str, "folder of images with same-name .txt captions, or a .jsonl manifest of {image, caption}"),
    "output": (str, "folder for lora.safetensors, log.jsonl, checkpoints/ and cache/"),
    "cache": (str, "folder of the cached latents and text embeddings (default OUTPUT/cache)"),
    "steps": (int, "optimizer steps (default 1000)"),
    "batch_size": (int, "global batch: over all processes and accumulation micro-steps (default 1)"),
    "grad_accum": (int, "micro-steps per optimizer step (default 1)"),
    "resolution": (int, "image side in pixels (default 512); with --buckets, the bucket area is its square"),
    "buckets": (bool, "aspect-ratio buckets instead of a center-cropped square"),
    "rank": (int, "LoRA rank (default 16)"),
    "alpha": (float, "LoRA alpha (default: the rank)"),
    "targets": (str, "comma-separated LoRA targets: attn, mlp, mod, or module regexes (default attn)"),
    "dropout": (float, "LoRA dropout (default 0)"),
    "train": (str, "what trains: lora (a TACA LoRA, default) or full (every weight, e.g. from a random init)"),
    "lr": (float, "AdamW learning rate (default 1e-4)"),
    "warmup_steps": (int, "linear warm-up steps (default 0)"),
    "lr_schedule": (str, "after the warm-up: constant (default) or cosine (down to 0 at the last step)"),
    "weight_decay": (float, "AdamW weight decay (default 0.01)"),
    "max_grad_norm": (float, "gradient clipping norm, 0 for none (default 1.0)"),
    "taca_gamma": (float, "TACA temperature of image-to-text logits (paper: 1.2; 1: no TACA)"),
    "t_min": (float, "train on t >= T_MIN, where TACA acts (paper: 0.97, model timestep 970)"),
    "timesteps": (str, "timestep sampling: window (U[t_min, 1], default), logit-normal, uniform"),
    "guidance": (float, "distilled guidance for FLUX-dev-type models (default 3.5)"),
    "seed": (int, "seed of the LoRA init, data order, noise and timesteps (default 0)"),
    "dtype": (str, "frozen base weights: bfloat16 (default), float16, float32"),
    "mixed_precision": (str, "autocast: bf16 (default) or no"),
    "gradient_checkpointing": (bool, "recompute activations in the backward (less memory)"),
    "checkpoint_every": (int, "steps between checkpoints (default 500)"),
    "keep_checkpoints": (int, "checkpoints kept (default 2)"),
    "device": (str, "default: cuda (the local rank under torchrun) if available, else cpu"),
    "progress": (bool, "progress bar (default on)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="TOML", help="a TOML file of settings (keys: the flag names)")
    for name, (kind, help) in FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            p.add_argument(flag, type=kind, default=None, help=help)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in OUTPUT/checkpoints (or the file given)")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a TACA LoRA", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    from .config import make_config
    from .loop import TrainingError, train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = make_config(args.config, resume=args.resume, **{k: getattr(args, k) for k in FLAGS})
    except ValueError as e:
        print(f"mmdit train: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except TrainingError as e:
        print(f"mmdit train: {e}", file=sys.stderr)
        return 1
    except (FileExistsError, FileNotFoundError, ValueError) as e:  # bad settings, data or files (CheckpointError too)
        print(f"mmdit train: {e}", file=sys.stderr)
        return 2
    return 130 if result.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_train(parser.parse_args(argv))
