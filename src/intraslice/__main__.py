"""``python -m intraslice`` (and ``torchrun --nproc-per-node N -m intraslice prune ...``)."""

import sys

from .cli import main

sys.exit(main())
