"""``python -m smartsplit``: the same as the ``smartsplit`` command."""

import sys

from smartsplit.cli import main

sys.exit(main())
