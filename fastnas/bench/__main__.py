"""``python -m fastnas.bench``: the search-step benchmark for one configuration."""

import sys

from fastnas.bench.step import main

sys.exit(main())
