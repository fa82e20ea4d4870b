"""``python -m lionopt.cli`` runs the ``lionopt`` command."""

import sys

from lionopt.cli import main

sys.exit(main())
