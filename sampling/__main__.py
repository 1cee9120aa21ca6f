"""`python -m sampling ...`: `mmdit sample` and `mmdit probe` (the `mmdit` command also has `train`: cli.py)."""

import sys

from .cli import main

sys.exit(main())
