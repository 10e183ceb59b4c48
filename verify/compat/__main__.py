"""``python -m verify.compat``: see :mod:`verify.compat.cli`."""

import sys

from .cli import main

sys.exit(main())
