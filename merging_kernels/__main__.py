"""``python -m merging_kernels``: the command line (see :mod:`merging_kernels.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
