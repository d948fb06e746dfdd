"""``python -m dcoord``: the same as the ``dcoord`` command."""

import sys

from .cli import main

sys.exit(main())
