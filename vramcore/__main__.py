"""``python -m vramcore``: the ``vramcore`` command line, for when the script is not on PATH."""

import sys

from vramcore._cli.cli import main

if __name__ == "__main__":
    sys.exit(main())
