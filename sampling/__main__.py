"""`python -m sampling ...` is the `mmdit` command."""

import sys

from .cli import main

sys.exit(main())
