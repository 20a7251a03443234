#!/usr/bin/env python
"""`megagrow regrow` (megagrow/cli/regrow.py): a checkpoint of stage k -> stage k+1 at any layout.
Kept for `torchrun ... tools/regrow.py` and scripts; megagrow must be installed (pip install -e .)."""

import sys

from megagrow.cli.regrow import main

if __name__ == "__main__":
    sys.exit(main())
