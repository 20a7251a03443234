"""Local rank processes: start W ranks of a command on this machine, wait for them, and make
sure none outlives its launcher.

* Each rank is started with a parent-death signal (Linux prctl PR_SET_PDEATHSIG): if the
  launcher dies, even by kill -9, the kernel kills its ranks, so no orphan keeps writing a
  stage directory that a new launcher is about to use.
* `wait_ranks` returns when every rank has exited. When one rank fails, the others get
  `grace_s` seconds to stop by themselves (their collectives time out or see the closed
  connection), then they are killed. The result names the rank that failed first.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from megagrow.errors import EXIT_OK, EXIT_PREEMPTED

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _child_setup() -> None:  # runs in the child between fork and exec
    set_parent_death_signal(signal.SIGKILL)


def spawn_ranks(cmd: list[str], n: int, env: dict | None = None, master_port: int | None = None, **popen) -> list[subprocess.Popen]:
    """Start `n` ranks of `cmd` on this machine (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set),
    each dying with this process."""
    from megagrow.parallel.groups import free_port

    port = str(master_port or free_port())
    procs = []
    for r in range(n):
        e = dict(os.environ if env is None else env)
        for k in [k for k in e if k.startswith("SLURM_STEP") or k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")]:
            e.pop(k, None)
        e.update(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(cmd, env=e, preexec_fn=_child_setup, **popen))
    return procs


def rc_of(code: int) -> int:
    """A Popen return code as a shell would show it (-9 -> 137)."""
    return 128 - code if code < 0 else code


def describe_rc(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


@dataclass
class RanksResult:
    rc: int  # 0, 75, or the first failing rank's code (shell style)
    failed_rank: int | None = None  # the rank that failed first
    failed_how: str = ""  # "killed by SIGKILL", "exit 1"
    others_stopped_s: float | None = None  # how long the other ranks took to stop after that
    killed: list | None = None  # ranks killed after the grace period

    def describe(self) -> str:
        if self.failed_rank is None:
            return f"exit {self.rc}"
        s = f"rank {self.failed_rank} failed first ({self.failed_how})"
        if self.killed:
            s += f"; ranks {', '.join(map(str, self.killed))} did not stop within the grace period and were killed"
        elif self.others_stopped_s is not None:
            s += f"; the other ranks stopped {self.others_stopped_s:.1f} s later"
        return s


def wait_ranks(procs: list, grace_s: float = 60.0, poll_s: float = 0.05) -> RanksResult:
    """Wait for all ranks; when one fails, give the rest `grace_s`, then kill them."""
    failed_at, first, killed = None, None, []
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        for r, c in enumerate(codes):
            if first is None and c is not None and rc_of(c) not in (EXIT_OK, EXIT_PREEMPTED):
                first, failed_at = r, time.time()
        if failed_at is not None and time.time() - failed_at > grace_s:
            for r, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                    killed.append(r)
            failed_at = float("inf")
        time.sleep(poll_s)
    done = time.time()
    codes = [p.returncode for p in procs]
    if first is None:
        bad = [r for r, c in enumerate(codes) if rc_of(c) not in (EXIT_OK, EXIT_PREEMPTED)]
        first = bad[0] if bad else None
    if first is not None:
        stopped = None if failed_at in (None, float("inf")) else done - failed_at
        return RanksResult(rc_of(codes[first]), first, describe_rc(codes[first]), stopped, killed or None)
    return RanksResult(EXIT_PREEMPTED if any(rc_of(c) == EXIT_PREEMPTED for c in codes) else EXIT_OK)


def exit_rank(rc: int):
    """End this rank's process now, with code `rc`, once its work is on disk and every rank is done.

    A trainer or regrow rank spends ~1.5 s in interpreter shutdown after its last save (tearing
    down torch, DeepSpeed and the process group module by module); os._exit skips that. Before
    it: stdout/stderr and logging are flushed, atexit handlers run (anything that registered a
    flush there keeps it), and all ranks meet at a barrier, so no rank disappears while another
    still talks to it. Everything megagrow writes (checkpoints, log.jsonl, status.json,
    manifests) is closed by then; the status and manifest files were fsynced when written.
    Only for the end of a rank's main(): nothing after this call runs.
    """
    import atexit
    import logging

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
