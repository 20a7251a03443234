#!/usr/bin/env python
"""`megagrow savings` (megagrow/results/driver.py): the savings experiment, run / list / report.
Kept for the Makefile and scripts; megagrow must be installed (pip install -e .)."""

import sys

from megagrow.results.driver import main

if __name__ == "__main__":
    sys.exit(main())
