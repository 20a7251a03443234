"""Helpers for tests that build small plans and datasets and call the `megagrow` command line.

run_cli(*args)           `python -m megagrow.cli ARGS` with the test environment -> CompletedProcess
one_error(r)             asserts one `error:` line on stderr, exit 2, no traceback; returns the line
tiny_dataset(prefix)     a token dataset PREFIX.bin/.idx of a few thousand tokens (no tokenizer run)
tiny_plan(path, data)    a small 2-stage plan YAML (a -> b by depth), with edits
tmpfs(path, size)        a tmpfs mounted at path for the test (read-only or small: a full disk);
                         the test is skipped where mounting is not permitted
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, _env


def run_cli(*args, timeout: float = 300, cwd: str = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """`megagrow ARGS` in a fresh interpreter (python -m megagrow.cli), output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "megagrow.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**_env(), **(env or {})},
        cwd=cwd,
        timeout=timeout,
    )


def one_error(r: subprocess.CompletedProcess, needle: str = "", code: int = 2) -> str:
    """The single `error:` line of a command that refused its input: exit `code`, no traceback."""
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == code, f"exit {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-4000:]
    assert needle in lines[0], lines[0]
    return lines[0]


def tiny_dataset(prefix: str, tokens: int = 20000, vocab: int = 512) -> str:
    """PREFIX.bin/.idx: one document of `tokens` token ids below `vocab` (megagrow's format)."""
    import numpy as np

    from megagrow.data.dataset import DatasetWriter

    with DatasetWriter(prefix, vocab) as w:
        w.add_document(np.arange(tokens, dtype=np.int64) % (vocab - 3) + 3)
    return prefix


def plan_dict(data: str, stages: int = 2) -> dict:
    """A plan of 1 or 2 tiny stages (a; b grows a by depth), 4 steps each, saving every 2, eval off."""
    model = {"n_layers": 1, "d_model": 32, "n_heads": 2, "vocab_size": 512, "seq_len": 16}
    layout = {"tp": 1, "dp": 1, "zero_stage": 1, "micro_batch": 2}
    d = {
        "name": "t",
        "seed": 1,
        "data": {"prefix": data},
        "defaults": {"steps": 4, "save_every": 2, "log_every": 1, "eval_tokens": 0, "optim": {"lr": "3e-4", "min_lr": 1.0e-5}},
        "stages": [
            {"name": "a", "model": model, "layout": layout},
            {"name": "b", "grow": "depth", "model": {**model, "n_layers": 2}, "layout": dict(layout)},
        ],
    }
    d["stages"] = d["stages"][:stages]
    return d


def tiny_plan(path, data: str, stages: int = 2, **top) -> str:
    """Write plan_dict (top-level keys replaced by `top`) as YAML to `path`; returns the path."""
    d = {**plan_dict(data, stages), **top}
    with open(path, "w") as f:
        yaml.safe_dump(d, f)
    return str(path)


@contextlib.contextmanager
def tmpfs(path, size: str = "1m", readonly: bool = False):
    """A tmpfs at `path` (created), unmounted at the end. Read-only: nothing can be written, even by
    root (whom chmod 0555 does not stop). Small: a disk that fills up. Skips the test where mount fails."""
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()[:200]}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: str, leave_kb: int) -> None:
    """Fill the file system of `path` until `leave_kb` KiB are left free."""
    free_kb = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize // 1024
    with open(os.path.join(path, "filler"), "wb") as f:
        f.write(b"\0" * max(0, free_kb - leave_kb) * 1024)
