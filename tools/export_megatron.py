"""`megagrow export-megatron` (megagrow/cli/export_megatron.py): a stage checkpoint -> a Megatron-LM checkpoint.
Kept for scripts; megagrow must be installed (pip install -e .)."""

import sys

from megagrow.cli.export_megatron import main

if __name__ == "__main__":
    sys.exit(main())
