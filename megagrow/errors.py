"""User-facing errors and the one wrapper every CLI uses to turn them into one clear line.

A `UserError` is a mistake of the person running megagrow (bad config, missing file, ...):
the CLI prints ``error: <message>`` on one line and exits with ``EXIT_USER_ERROR``, never a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

EXIT_OK = 0
EXIT_USER_ERROR = 2
# A stage stopped early on SIGUSR1/SIGTERM after saving a checkpoint: the job should be
# requeued/resumed. Distinct from success and from errors (Slurm requeue logic keys on it).
EXIT_PREEMPTED = 75
# The stage diverged: a non-finite loss, gradient norm or weight (nothing non-finite was saved).
# Not retried by the controller: the same data and LR would diverge again.
EXIT_NONFINITE = 3
# A collective failed or timed out: another rank died or hung. The launcher names that rank.
EXIT_PEER_LOST = 74


class UserError(Exception):
    """A problem with the user's input; reported as one line, non-zero exit.

    `all_ranks=True`: every rank of a distributed job raises this same error (it was agreed on
    collectively), so only rank 0 prints it: one line, not one per rank."""

    def __init__(self, message: str = "", all_ranks: bool = False):
        super().__init__(message)
        self.all_ranks = all_ranks


def _rank() -> int:
    import os

    for k in ("RANK", "SLURM_PROCID"):
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 0


def cli_entry(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI main(): UserError -> one line on stderr + EXIT_USER_ERROR."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = fn(*args, **kwargs)
            return EXIT_OK if rc is None else int(rc)
        except UserError as e:
            if not (getattr(e, "all_ranks", False) and _rank() != 0):
                print(f"error: {e}", file=sys.stderr, flush=True)
            return getattr(e, "exit_code", EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr, flush=True)
            return 130

    return wrapper
