"""Temporary alias of :mod:`mfli.orchestration.cli` (``python -m mfli.cli``) until every caller moved."""

import sys

from mfli.orchestration.cli import main

if __name__ == "__main__":
    sys.exit(main())
