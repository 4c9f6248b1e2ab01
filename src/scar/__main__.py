"""``python -m scar``: the ``scar`` command."""

import sys

from scar.cli import main

sys.exit(main())
