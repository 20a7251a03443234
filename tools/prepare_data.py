#!/usr/bin/env python3
"""`megagrow prepare-data` (megagrow/data/prepare.py): text -> sentencepiece tokenizer + token dataset.
Kept for scripts and the Makefile; megagrow must be installed (pip install -e .)."""

import sys

from megagrow.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
