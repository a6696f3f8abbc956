"""``python -m kvlight.cli ...``: the ``kvlight`` command."""

import sys

from kvlight.cli import main

if __name__ == "__main__":
    sys.exit(main())
