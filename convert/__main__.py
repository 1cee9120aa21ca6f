"""`python -m convert inspect PATH`: what a checkpoint was detected as, without loading its weights."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from .files import CheckpointError
from .load import detect_transformer


def inspect(path: str) -> str:
    d = detect_transformer(path)
    lines = [
        f"source:     {d.source}",
        f"family:     {d.family}",
        f"layout:     {d.layout}",
        f"variant:    {d.variant}",
        f"dtype:      {str(d.storage_dtype).removeprefix('torch.')}",
        f"parameters: {d.num_params:,}",
        f"tensors:    {len(d.ckpt)}",
    ]
    lines += [f"  {k} = {list(v) if isinstance(v, tuple) else v}" for k, v in asdict(d.params).items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("inspect", help="print the detected family, variant, dims, dtype, parameter count").add_argument("path")
    args = ap.parse_args(argv)
    try:
        print(inspect(args.path))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
