"""`python -m toydiff` (and `torchrun -m toydiff`) run the command line."""

import sys

from .cli import main

sys.exit(main())
