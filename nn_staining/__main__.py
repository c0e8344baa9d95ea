"""``python -m nn_staining``."""

import sys

from .cli import main

sys.exit(main())
