"""A megagrow stage checkpoint -> a Hugging Face transformers model directory (see --help)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagrow.export_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
