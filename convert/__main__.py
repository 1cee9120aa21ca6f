"""`python -m convert inspect PATH`: what a file is, without loading its weights (convert/describe.py);
`python -m convert random PRESET PATH`: a random-weight checkpoint in a preset's official layout."""

from __future__ import annotations

import argparse
import sys

import torch

from .describe import describe
from .families import FAMILIES
from .files import CheckpointError
from .synthetic import random_checkpoint


def inspect(path: str) -> str:
    """The description `python -m convert inspect` prints (convert/describe.py)."""
    return describe(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("inspect", help="describe a transformer, text encoder, autoencoder, LoRA or quantized file "
                          "(family, variant, dims, dtype; LoRA format, ranks, alphas, targets)")
    show.add_argument("path")
    rnd = sub.add_parser("random", help="write a random-weight checkpoint in a preset's official layout")
    rnd.add_argument("preset", help=", ".join(name for layout in FAMILIES.values() for name in layout.PRESETS))
    rnd.add_argument("path")
    rnd.add_argument("--tiny", action="store_true", help="two blocks of each kind, narrow width, same layout")
    rnd.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    rnd.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "inspect":
            print(inspect(args.path))
        else:
            random_checkpoint(args.preset, args.path, getattr(torch, args.dtype), args.tiny, args.seed)
            print(f"wrote {args.path} (random weights, {args.preset} layout{', tiny' if args.tiny else ''})")
    except (CheckpointError, ValueError) as e:
        print(f"python -m convert {args.cmd}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
