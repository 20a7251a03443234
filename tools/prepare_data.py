#!/usr/bin/env python3
"""Text -> sentencepiece tokenizer + memory-mapped token dataset (see megagrow/data/prepare.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megagrow.data.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
