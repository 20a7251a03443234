"""`python -m megagrow.cli ARGS` is `megagrow ARGS` (torchrun -m / srun python -m need a module)."""

import sys

from megagrow.cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
