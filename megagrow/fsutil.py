"""Small file-system helpers shared by every room: atomic JSON writes, quiet unlinks."""

from __future__ import annotations

import json
import os


def write_json_atomic(path: str, obj: dict) -> None:
    """Write `obj` as JSON to `path` so that readers see the old file or the whole new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, interrupted: the old file stays, no temp file is left behind
        unlink_quietly(tmp)
        raise


def read_json(path: str):
    """The JSON object in `path`, or None if the file is missing, unreadable or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
