"""``python -m fastnas``: the fastnas command."""

import sys

from fastnas.cli import main

if __name__ == "__main__":
    sys.exit(main())
