"""`python -m training ...`: the same as `mmdit train ...` (torchrun: `torchrun --nproc-per-node N -m training ...`)."""

import sys

from .cli import main

sys.exit(main())
