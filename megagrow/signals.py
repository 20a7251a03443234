"""Catch SIGUSR1/SIGTERM from the first instant of a process, before torch is imported.

A stage process spends seconds importing torch/DeepSpeed before the trainer installs its
own handlers; a preemption signal that lands in that window would kill it with Python's
default action. `install_early()` (called first thing by `megagrow train`) records such a
signal, and the trainer's StopFlag starts from `early_signal()`, so the stage still saves
at its first step boundary and exits 75.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_pending: list[int] = []


def _record(signum, frame) -> None:
    _pending.append(signum)


def install_early(signals=STOP_SIGNALS) -> None:
    """Record stop signals from now on. A launcher that starts ranks with these signals blocked
    (megagrow.procs.spawn_ranks) closes the window before this call too: a signal sent then stays
    pending and is delivered here, once the handler is in."""
    for s in signals:
        signal.signal(s, _record)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def early_signal() -> int | None:
    """The first stop signal received before the trainer's own handlers, if any."""
    return _pending[0] if _pending else None


class StopFlag:
    """Signal handlers only set this flag; ranks agree on it at step boundaries (the trainer
    folds the vote into its one per-step all-reduce; `agreed` is the stand-alone vote)."""

    def __init__(self, signals=STOP_SIGNALS):
        self.raised: int | None = early_signal()  # one caught while torch was still importing
        for s in signals:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.raised = signum

    def agreed(self, device) -> bool:
        import torch

        from megagrow import collectives

        t = torch.tensor([1.0 if self.raised else 0.0], device=device)
        collectives.all_reduce(t, op="max")
        return bool(t.item() > 0)
