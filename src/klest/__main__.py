"""``python -m klest``: the same command as the ``klest`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
