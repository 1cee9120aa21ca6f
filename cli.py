"""The `mmdit` command: `mmdit sample` and `mmdit probe` (sampling/cli.py), `mmdit train` (training/cli.py).

The packages sit in layers (mmdit <- convert <- sampling <- training); only this file, above them all,
knows every subcommand. `mmdit sample` and `mmdit probe` import nothing from training.
"""

from __future__ import annotations

import sys

import sampling.cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["sample"], ["probe"]):
        return sampling.cli.main(argv)
    from training.cli import add_train_parser  # the whole training package: only for `mmdit train` and `mmdit --help`

    return sampling.cli.main(argv, more=[add_train_parser])


if __name__ == "__main__":
    sys.exit(main())
