"""``python -m adaptserve ...`` = the ``adaptserve`` command (``torchrun -m adaptserve train ...`` too)."""

import sys

from adaptserve.cli import main

sys.exit(main())
