"""Exit codes, the errors a CLI reports as one line, and the wrapper every CLI uses.

Every `MegagrowError` is printed as one ``error: <message>`` line on stderr, never a traceback,
and the process exits with the error's `exit_code`:

    MegagrowError
      UserError      a mistake of the person running megagrow (bad config, missing file, ...): exit 2
      RunFailure     the run failed through no mistake of the user's; `megagrow train` marks the
                     stage failed in its status.json
        SaveFailed   a checkpoint could not be written (disk full): exit 2, not retried
        NonFinite    the stage diverged (a non-finite loss, gradient norm or weight): exit 3, not retried

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

EXIT_OK = 0
# The run failed: a stage failed and was not retried, or its retries ran out (`megagrow run`).
EXIT_FAILED = 1
EXIT_USER_ERROR = 2
# A stage stopped early on SIGUSR1/SIGTERM after saving a checkpoint: the job should be
# requeued/resumed. Distinct from success and from errors (Slurm requeue logic keys on it).
EXIT_PREEMPTED = 75
# The stage diverged: a non-finite loss, gradient norm or weight (nothing non-finite was saved).
# Not retried by the controller: the same data and LR would diverge again.
EXIT_NONFINITE = 3
# A collective failed or timed out: another rank died or hung. The launcher names that rank.
EXIT_PEER_LOST = 74


class MegagrowError(Exception):
    """Reported as one line, exit `exit_code`.

    `all_ranks=True`: every rank of a distributed job raises this same error (it was agreed on
    collectively), so only rank 0 prints it: one line, not one per rank."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str = "", all_ranks: bool = False):
        super().__init__(message)
        self.all_ranks = all_ranks


class UserError(MegagrowError):
    """A problem with the user's input; reported as one line, exit EXIT_USER_ERROR."""


class RunFailure(MegagrowError):
    """The run failed through no mistake of the user's: one line, the stage marked failed."""

    exit_code = EXIT_FAILED


class SaveFailed(RunFailure):
    """A checkpoint could not be written (the disk is full, the file system failed); the previous
    complete checkpoint is kept. Exit EXIT_USER_ERROR: the controller does not retry it (the
    disk stays full until someone frees it)."""

    exit_code = EXIT_USER_ERROR


class NonFinite(RunFailure):
    """The stage diverged (a non-finite loss, gradient norm or weight): exit EXIT_NONFINITE, not
    retried; raised on every rank alike (the values it is decided on are all-reduced)."""

    exit_code = EXIT_NONFINITE

    def __init__(self, message: str):
        super().__init__(message, all_ranks=True)


def _rank() -> int:
    import os

    for k in ("RANK", "SLURM_PROCID"):
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 0


def cli_entry(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI main(): a MegagrowError -> one line on stderr + its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = fn(*args, **kwargs)
            return EXIT_OK if rc is None else int(rc)
        except MegagrowError as e:
            if not (e.all_ranks and _rank() != 0):
                print(f"error: {e}", file=sys.stderr, flush=True)
            return e.exit_code
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr, flush=True)
            return 130

    return wrapper
