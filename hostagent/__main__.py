"""Entry point for `python -m hostagent`."""

import sys

from hostagent.cli import main

sys.exit(main())
