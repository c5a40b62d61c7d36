"""``python -m ktlegacy.core CMD``: the image stages' commands, with only this sub-package."""

import sys

from . import commands, stub, triton_check  # noqa: F401  (each registers its commands)
from .command import main

sys.exit(main())
