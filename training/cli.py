"""`mmdit train` (also `python -m training`): train a TACA LoRA (or, `--train full`, every weight) from flags
and/or a TOML config.

Every flag is a field of `TrainConfig` (training/config.py); a flag given on the command line wins
over the TOML file, which wins over the defaults (resuming: over the run's own settings). Exit codes:
0 done, 1 stopped on a non-finite loss, 2 bad settings, data or files, 3 a file could not be written
(disk full, no permission; the last complete checkpoint is kept), 130 interrupted by Ctrl-C or SIGTERM
(the last complete step is in a checkpoint: rerun with --output and --resume).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import MISSING, Field, fields

from .config import REQUIRED, TrainConfig, make_config
from .disk import WriteError
from .loop import TrainingError, train

# how a flag's value is read, per field type of TrainConfig (a list is given comma-separated)
FLAG_TYPES = {"str": str, "str | None": str, "list[str]": str, "int": int, "int | None": int, "float": float,
              "float | None": float}


def help_text(f: Field) -> str:
    """The field's help and its default ("default: ..." in the help itself where the default is None)."""
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    if f.name in REQUIRED:
        return f"{f.metadata['help']} (required)"
    if default is None:
        return f.metadata["help"]
    if isinstance(default, bool):
        default = "on" if default else "off"
    elif isinstance(default, list):
        default = ",".join(default)
    return f"{f.metadata['help']} (default {default})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="TOML", help="a TOML file of settings (keys: the flag names; no default)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "resume":
            p.add_argument(flag, nargs="?", const="latest", metavar="CHECKPOINT", help=help_text(f))
        elif f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text(f))
        else:
            p.add_argument(flag, type=FLAG_TYPES[f.type], help=help_text(f))


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a TACA LoRA", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = make_config(args.config, **{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    except (FileNotFoundError, ValueError) as e:  # a TOML file or checkpoint that is not there or not right
        print(f"mmdit train: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except TrainingError as e:
        print(f"mmdit train: {e}", file=sys.stderr)
        return 1
    except WriteError as e:  # before FileExistsError, FileNotFoundError: all OSErrors
        print(f"mmdit train: {e}", file=sys.stderr)
        return 3
    except (FileExistsError, FileNotFoundError, ValueError) as e:  # bad settings, data or files (CheckpointError too)
        print(f"mmdit train: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the steps: while caching or writing the result
        print("mmdit train: interrupted (what was cached or checkpointed is kept: rerun, with --resume if a "
              "checkpoint was written)", file=sys.stderr)
        return 130
    return 130 if result.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_train(parser.parse_args(argv))
