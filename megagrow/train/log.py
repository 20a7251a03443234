"""A stage's log: RUN/<stage>/log.jsonl, one JSON object per logged step, written by rank 0.

On resume the records past the checkpoint's step are dropped first: steps logged after the
last save of a run killed without a signal are trained again and must not appear twice.
"""

from __future__ import annotations

import json
import os

from megagrow.fsutil import read_records, write_file_atomic


def trim_log(path: str, step: int) -> None:
    """Drop log records past `step` (the checkpoint resumed from), and a torn last line."""
    if not os.path.isfile(path):
        return
    with open(path, errors="replace") as f:
        lines = sum(1 for _ in f)
    keep = [r for r in read_records(path) if isinstance(r.get("step"), int) and r["step"] <= step]
    if len(keep) != lines:
        write_file_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


class StageLog:
    """Appends records to log.jsonl (rank 0 only; on other ranks every call is a no-op)."""

    def __init__(self, path: str, resume_step: int, active: bool):
        self.path = path
        self.f = None
        if active:
            trim_log(path, resume_step)
            self.f = open(path, "a")

    def write(self, rec: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
