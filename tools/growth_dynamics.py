#!/usr/bin/env python
"""`megagrow growth-dynamics` (megagrow/results/dynamics.py): the training-dynamics check at tiny scale.
Kept for scripts; megagrow must be installed (pip install -e .)."""

import sys

from megagrow.results.dynamics import main

if __name__ == "__main__":
    sys.exit(main())
