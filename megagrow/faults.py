"""Fault injection for the reliability tests: kill this rank with SIGKILL (or hang it) at a named point.

Inert unless MEGAGROW_FAULT is set (one environment read per process), e.g.

    MEGAGROW_FAULT='{"point": "save.file", "rank": 1, "step": 4, "n": 2}'

kills rank 1 right after it wrote its 2nd file of the checkpoint save at step 4. Keys:
  point  where (below); rank  the rank that dies (omitted: every rank that reaches it);
  step   only at this step (the save's or the training step); n  for save.file: after the n-th file;
  once   a marker file path: fire only if it does not exist yet (and create it), so a retry runs clean
         ("{rank}" in it is replaced by the rank: each rank fires once);
  action "kill" (default: SIGKILL) or "hang" (sleep for good outside any collective; the rank's
         signal handlers only set flags, so it lives until SIGKILL).
Points: "step" (after a training step), "save.before", "save.file", "save.after" (a training
save), "seal.checksummed" (a rank's own checksums done, before rank 0 gathers them),
"seal.manifest" (rank 0: manifest written, `latest` not yet moved), "transition.regrown" (the
grown checkpoint written, not sealed), "transition.sealed" (sealed, not yet renamed into place),
"regrow.sealed" (tools/regrow.py: sealed, not yet renamed).
A kill by the kernel is what a node loss or an OOM kill does: no handler, no cleanup.
"""

from __future__ import annotations

import json
import os
import signal
import time

_spec: dict | None = None
_loaded = False
_step: int | None = None


def _get() -> dict | None:
    global _spec, _loaded
    if not _loaded:
        _loaded = True
        raw = os.environ.get("MEGAGROW_FAULT")
        _spec = json.loads(raw) if raw else None
    return _spec


def active() -> bool:
    return _get() is not None


def set_step(step: int | None) -> None:
    """The step the points that follow belong to (a save's step)."""
    global _step
    _step = step


def point(name: str, step: int | None = None, n: int | None = None) -> None:
    spec = _get()
    if spec is None or spec.get("point") != name:
        return
    if spec.get("rank") is not None and int(os.environ.get("RANK", "0")) != int(spec["rank"]):
        return
    step = _step if step is None else step
    if spec.get("step") is not None and step != spec["step"]:
        return
    if spec.get("n") is not None and n != spec["n"]:
        return
    once = spec.get("once")  # a marker file: the fault fires in one launch only (a retry then runs clean)
    if once:
        try:
            os.close(os.open(once.replace("{rank}", os.environ.get("RANK", "0")), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if spec.get("action") == "hang":  # stuck for good outside any collective (a dead file system, a deadlock)
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(engine) -> None:
    """Count the files this rank writes in each DeepSpeed save ("save.file" points)."""
    if _get() is None or _get().get("point") != "save.file":
        return
    ce = engine.checkpoint_engine
    real = ce.save
    count = {"n": 0, "step": None}

    def save(state_dict, path, *a, **kw):
        if count["step"] != _step:
            count.update(n=0, step=_step)
        out = real(state_dict, path, *a, **kw)
        count["n"] += 1
        point("save.file", n=count["n"])
        return out

    ce.save = save
