#!/usr/bin/env python
"""`megagrow export-hf` (megagrow/cli/export.py): a stage checkpoint -> a transformers model directory.
Kept for scripts; megagrow must be installed (pip install -e .)."""

import sys

from megagrow.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
