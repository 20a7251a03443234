#!/usr/bin/env python
"""Convert a checkpoint of stage k into stage k+1 at any layout (see megagrow/regrow_cli.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagrow.regrow_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
