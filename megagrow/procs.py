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

from megagrow.errors import EXIT_OK, EXIT_PEER_LOST, EXIT_PREEMPTED

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
    # stop signals stay blocked (pending, not fatal) until the rank installs its handlers
    # (megagrow.signals.install_early unblocks them): safe to signal from the first instant
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR1, signal.SIGTERM))


def spawn_ranks(cmd: list[str], n: int, env: dict | None = None, master_port: int | None = None, **popen) -> list[subprocess.Popen]:
    """Start `n` ranks of `cmd` on this machine (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set),
    each dying with this process, with SIGUSR1/SIGTERM blocked until the command unblocks them
    (`megagrow train` and tools/regrow.py do, first thing)."""
    from megagrow.parallel.groups import free_port

    port = str(master_port or free_port())
    procs = []
    for r in range(n):
        e = dict(os.environ if env is None else env)
        _set_rank_env(e, r, n, port)
        procs.append(subprocess.Popen(cmd, env=e, preexec_fn=_child_setup, **popen))
    return procs


def _set_rank_env(env, r: int, n: int, port: str) -> None:
    """Make `env` (a dict, or os.environ itself) rank r of n local ranks meeting at 127.0.0.1:port,
    with no Slurm step variables left to make a rank think srun started it."""
    for k in [k for k in env if k.startswith("SLURM_STEP") or k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")]:
        env.pop(k, None)
    env.update(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)


class Forked:
    """A rank forked from this process, waited for as a subprocess.Popen is (poll, kill, returncode)."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N when killed by signal N, as Popen
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


def fork_ranks(fn, n: int, master_port: int | None = None) -> list[Forked]:
    """Start `n` ranks on this machine as forks of this process, each running `fn()` (its return value
    the exit code) with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set, dying with this process.
    A fork inherits every module this process imported (torch's import alone is 1.5-2 s per process)
    and every object it built. Only before this process starts threads of its own or a process group:
    a fork copies one thread and no connection."""
    from megagrow.parallel.groups import free_port

    port = str(master_port or free_port())
    sys.stdout.flush()
    sys.stderr.flush()
    procs = []
    for r in range(n):
        pid = os.fork()
        if pid:
            procs.append(Forked(pid))
            continue
        rc = 1
        try:
            set_parent_death_signal(signal.SIGKILL)
            _set_rank_env(os.environ, r, n, port)
            rc = fn()
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc or 0)
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

    codes: list | None = None  # every rank's code (shell style)
    hung_s: float | None = None  # the hang watchdog stopped the ranks: seconds without progress

    def describe(self) -> str:
        if self.hung_s is not None:
            return f"hung: no progress for {self.hung_s:.0f} s (no step finished; reliability.hang_timeout_s), every rank stopped"
        if self.failed_rank is None:
            return f"exit {self.rc}"
        if self.codes and len(set(self.codes)) == 1 and not self.killed:
            return f"every rank: {self.failed_how}"
        if self.killed and self.failed_rank in self.killed:
            return f"rank {self.failed_rank} hung (did not stop within the grace period; killed)"
        s = f"rank {self.failed_rank} failed first ({self.failed_how})"
        if self.killed:
            s += f"; ranks {', '.join(map(str, self.killed))} did not stop within the grace period and were killed"
        elif self.others_stopped_s is not None:
            s += f"; the other ranks stopped {self.others_stopped_s:.1f} s later"
        return s


def wait_ranks(
    procs: list, grace_s: float = 60.0, poll_s: float = 0.05, heartbeat: str | None = None, hang_s: float = 0.0, stop_hung=None
) -> RanksResult:
    """Wait for all ranks; when one fails, give the rest `grace_s`, then kill them. The rank named
    as the failure is the first to exit with a code of its own (not 0, 75, or EXIT_PEER_LOST, which
    a survivor of a lost peer exits with); else a rank that had to be killed (it hung); else the
    first that failed.

    Hang watchdog (hang_s > 0): when the file `heartbeat` (rank 0 rewrites it as steps finish) has not
    changed for hang_s, counted from this call, no rank is making progress: every process is stopped
    with `stop_hung(p)` (default: SIGKILL), killed after `grace_s` if it is still there, and the
    result says so (`hung_s`). The age is this host's monotonic time since the watchdog last saw the
    file change (`HeartbeatWatch`), never a timestamp stamped by rank 0's host (whose clock may be off
    by seconds or hours); checked at most every few seconds, each observation published for `megagrow
    status` on the heartbeat's file-system clock (`FsClock`)."""
    from megagrow.fsutil import FsClock, HeartbeatWatch

    failed_at, killed, order = None, [], []
    hung = None
    clock = FsClock(heartbeat + ".watchdog") if hang_s > 0 and heartbeat else None
    watch = HeartbeatWatch(heartbeat) if clock else None
    every = max(poll_s, min(5.0, hang_s / 4)) if clock else 0.0
    checked = time.monotonic()
    while True:
        codes = [p.poll() for p in procs]
        for r, c in enumerate(codes):
            if c is not None and r not in order:
                order.append(r)
        if all(c is not None for c in codes):
            break
        if clock and hung is None and failed_at is None and time.monotonic() - checked >= every:
            checked = time.monotonic()
            idle = watch.age()
            watch.publish(clock.now())
            if idle > hang_s:
                hung = idle
                for p in procs:
                    if p.poll() is None:
                        (stop_hung or (lambda q: q.kill()))(p)
                failed_at = time.time()
        if failed_at is None and any(c is not None and rc_of(c) not in (EXIT_OK, EXIT_PREEMPTED) for c in codes):
            failed_at = time.time()
        if failed_at is not None and failed_at != float("inf") and time.time() - failed_at > grace_s:
            for r, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                    killed.append(r)
            failed_at = float("inf")
        time.sleep(poll_s)
    done = time.time()
    codes = [rc_of(p.returncode) for p in procs]
    bad = [r for r in order if codes[r] not in (EXIT_OK, EXIT_PREEMPTED)]
    if hung is not None and bad:  # (every rank may still have finished cleanly in the same instant)
        return RanksResult(codes[bad[0]], bad[0], "hung", None, killed or None, codes, hung_s=hung)
    if not bad:
        return RanksResult(EXIT_PREEMPTED if EXIT_PREEMPTED in codes else EXIT_OK, codes=codes)
    own = [r for r in bad if codes[r] != EXIT_PEER_LOST and r not in killed]
    first = own[0] if own else (killed[0] if killed else bad[0])
    how = "hung: did not stop and was killed" if first in killed else describe_rc(procs[first].returncode)
    stopped = None if failed_at in (None, float("inf")) else done - failed_at
    return RanksResult(codes[first], first, how, stopped, killed or None, codes)


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
        from megagrow import collectives

        collectives.barrier()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
