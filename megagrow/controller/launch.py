"""The controller's loop: launch each stage at its layout (locally one process per rank, under
Slurm srun on the allocation's first hosts), forward signals, hand a stage that needs more nodes
on to a dependent job, and keep the manifest."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

from megagrow.config import Plan
from megagrow.controller.allocation import Allocation, Placement, place
from megagrow.controller.progress import next_action, read_manifest, read_progress
from megagrow.errors import EXIT_FAILED, EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR, UserError
from megagrow.fsutil import read_json, write_json_atomic
from megagrow.paths import RunPaths

PORT_LO, PORT_SPAN = 20000, 12000  # derived ports: 20000-31999, below Linux's ephemeral range (32768-60999)


def master_port(job_id: str | None, launch: int, uid: int | None = None) -> int:
    """A launch's MASTER_PORT when it cannot be picked free on the first host: a hash of the job id,
    the run's launch counter (kept in RUN/manifest.json, so it goes on counting over requeues) and
    the user id, in 20000-31999. Jobs of other users or other job ids sharing a node, and consecutive
    launches of one run, land on unrelated ports (job id mod 4000 alone collided: jobs 17 and 4017)."""
    import zlib

    uid = os.getuid() if uid is None else uid
    return PORT_LO + zlib.crc32(f"{job_id}:{launch}:{uid}".encode()) % PORT_SPAN


def _free_port() -> int:
    """A port free on all of this host's interfaces now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _is_this_host(host: str) -> bool:
    names = {socket.gethostname(), socket.gethostname().split(".")[0], os.environ.get("SLURMD_NODENAME", "")}
    return host in names or host.split(".")[0] in names


def launch_port(job_id: str | None, launch: int, first_host: str) -> int:
    """MASTER_PORT of a launch whose rank 0 runs on `first_host`: a port free there when that host is
    this one (the batch script runs on the allocation's first node), else `master_port`."""
    return _free_port() if _is_this_host(first_host) else master_port(job_id, launch)


def _cancel_srun_step(p: subprocess.Popen) -> None:
    """srun ends its job step (all tasks, on every node) on two SIGINTs within a second."""
    for _ in range(2):
        try:
            p.send_signal(signal.SIGINT)
        except OSError:
            return
        time.sleep(0.3)


def _clean_env(drop_slurm_step: bool = False) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(k, None)
    if drop_slurm_step:
        for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NPROCS"):
            env.pop(k, None)
    return env


def _rewrite_in_place(path: str, m: dict) -> bool:
    """A full disk: overwrite the manifest in the blocks it has (no new ones needed), its oldest events
    dropped until it fits in its old size. Not atomic, so only the fallback; False when it cannot."""
    import json

    try:
        old = os.path.getsize(path)
        m = dict(m)
        while True:
            data = json.dumps(m, indent=1, sort_keys=True).encode()
            if len(data) <= old or not m["events"]:
                break
            m["events"] = m["events"][1:]
        if len(data) > old:
            return False
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate(len(data))
            f.flush()
            os.fsync(f.fileno())
        return True
    except (OSError, KeyError):
        return False


class Controller:
    def __init__(
        self,
        plan: Plan,
        plan_path: str,
        run_dir: str,
        alloc: Allocation,
        data: str | None = None,
        grace_s: float = 60.0,
        out=None,
        retries: int | None = None,
        overrides: tuple = (),
    ):
        self.plan, self.plan_path, self.run_dir, self.alloc = plan, os.path.abspath(plan_path), run_dir, alloc
        self.data = data
        self.overrides = tuple(overrides)  # `--set KEY=VALUE` of the plan: every stage is launched with them
        self.grace_s = grace_s
        self.out = out or sys.stdout
        self.stop: int | None = None
        self.procs: list[subprocess.Popen] = []
        self.manifest = read_manifest(run_dir) or {}
        launches = self.manifest.get("launches", 0)
        self.launches = launches if isinstance(launches, int) and launches >= 0 else 0  # counted over requeues
        self.retries = retries  # None: the plan's reliability.retries
        self.last_failure: str | None = None
        self.noted: set = set()  # the notes already printed
        self.avoid: tuple = ()  # the hosts of the launch that failed last: a retry runs elsewhere where it can

    # ---- output and manifest
    def say(self, msg: str) -> None:
        print(f"[megagrow run] {msg}", file=self.out, flush=True)

    def write_manifest(self, state: str, current: dict | None = None, event: dict | None = None) -> dict:
        """RUN/manifest.json: what cannot be derived from the stages' sealed checkpoints (the run's state
        as the controller left it, the current action, the allocation, the launch counter, the events).
        Each stage's state, step and checkpoint are not stored: `megagrow status` derives them."""
        events = list(self.manifest.get("events", []))
        if event:
            events.append({"time": round(time.time(), 3), **event, **self._job()})
        m = {
            "format": 1,
            "plan_file": self.plan_path,
            "overrides": list(self.overrides),  # applied to plan_file; "plan" is the result
            "plan": self.plan.to_dict(),
            "run_dir": os.path.abspath(self.run_dir),
            "state": state,
            "current": current,
            "launches": self.launches,  # survives a requeue: MASTER_PORT differs from every earlier launch
            "allocation": {
                "kind": self.alloc.kind,
                "hosts": list(self.alloc.hosts),
                "tasks_per_node": self.alloc.tasks_per_node,
                "job_id": self.alloc.job_id,
                "restart_count": self.alloc.restart_count,
            },
            "events": events[-200:],
            "updated": round(time.time(), 3),
        }
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            write_json_atomic(RunPaths(self.run_dir).manifest, m)  # leaves no temp file when it fails
        except OSError as e:
            if _rewrite_in_place(RunPaths(self.run_dir).manifest, m):  # disk full: the state still says failed
                self.manifest = m
                return m
            raise UserError(
                f"cannot write {RunPaths(self.run_dir).manifest} ({e.strerror or e}); the stages' "
                f"checkpoints are the truth: free space and run again"
            ) from None
        self.manifest = m
        return m

    def _job(self) -> dict:
        return {"job_id": self.alloc.job_id, "restart": self.alloc.restart_count} if self.alloc.kind == "slurm" else {"pid": os.getpid()}

    # ---- signals
    def install_signals(self) -> None:
        for s in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        first = self.stop is None
        self.stop = signum
        if first:
            print(f"[megagrow run] {signal.Signals(signum).name}: asking the running stage to save", file=self.out, flush=True)
        self._forward()

    def _forward(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGUSR1)
                except OSError:
                    pass

    # ---- one stage
    def train_cmd(self, k: int) -> list[str]:
        cmd = [sys.executable, "-m", "megagrow.cli", "train", self.plan_path, "--stage", str(k), "--run-dir", self.run_dir]
        if self.data:
            cmd += ["--data", self.data]
        for o in self.overrides:
            cmd += ["--set", o]
        return cmd

    def launch(self, k: int, pl: Placement) -> int:
        """Run stage k's ranks to their end; returns 0, 75 or a failure code."""
        if self.alloc.kind == "slurm":
            return self._launch_srun(k, pl)
        return self._launch_local(k, pl)

    def _launch_local(self, k: int, pl: Placement) -> int:
        # each rank dies with this controller (parent-death signal) and starts with SIGUSR1/SIGTERM
        # blocked until its handlers are in (megagrow.signals.install_early): a preemption signal
        # forwarded at any moment is never fatal to a rank
        from megagrow.procs import spawn_ranks

        self.procs = spawn_ranks(self.train_cmd(k), pl.ntasks, env=_clean_env(drop_slurm_step=True))
        if self.stop:
            self._forward()
        return self._wait_all(k)

    def _launch_srun(self, k: int, pl: Placement) -> int:
        env = _clean_env(drop_slurm_step=True)
        env.update(MASTER_ADDR=pl.hosts[0], MASTER_PORT=str(launch_port(self.alloc.job_id, self.launches, pl.hosts[0])))
        cmd = [
            "srun",
            f"--nodes={pl.nodes}",
            f"--ntasks={pl.ntasks}",
            f"--ntasks-per-node={pl.tasks_per_node}",
            f"--nodelist={','.join(pl.hosts)}",
            "--distribution=block",
            f"--wait={int(self.grace_s)}",
            "--kill-on-bad-exit=0",
            f"--job-name={self.plan.stages[k].name}",
        ]
        if os.environ.get("SLURM_CPUS_PER_TASK"):  # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05)
            cmd.append(f"--cpus-per-task={os.environ['SLURM_CPUS_PER_TASK']}")
        cmd += self.train_cmd(k)
        self.say(f"srun on {','.join(pl.hosts)}: {pl.ntasks} ranks, MASTER_ADDR={pl.hosts[0]} MASTER_PORT={env['MASTER_PORT']}")
        self.procs = [subprocess.Popen(cmd, env=env)]
        if self.stop:
            self._forward()
        return self._wait_all(k, stop_hung=_cancel_srun_step)

    def _wait_all(self, k: int, stop_hung=None) -> int:
        """Wait for every process; when one fails (not 0, not 75), give the others `grace_s`
        to finish by themselves, then kill them (a rank left alone blocks in a collective until its
        timeout). A stage whose heartbeat is older than reliability.hang_timeout_s is hung: its
        processes are stopped (`stop_hung`, default SIGKILL). Locally the failure is described by
        rank (`self.last_failure`); a hang is described under Slurm too."""
        from megagrow.procs import wait_ranks

        hb = RunPaths(self.run_dir).stage(self.plan.stages[k].name).heartbeat
        res = wait_ranks(
            self.procs, grace_s=self.grace_s, poll_s=0.1, heartbeat=hb, hang_s=self.plan.reliability.hang_timeout_s, stop_hung=stop_hung
        )
        self.procs = []
        local = res.failed_rank is not None and self.alloc.kind == "local"
        self.last_failure = res.describe() if local or res.hung_s is not None else None
        return res.rc

    # ---- dependent job
    def submit_dependent(self, k: int, pl: Placement) -> str:
        a = self.alloc
        if not a.script:
            raise UserError(
                f"stage {self.plan.stages[k].name!r} needs {pl.nodes} nodes, this job has {a.nodes}, and the "
                f"batch script is unknown (MEGAGROW_SBATCH_SCRIPT); submit it with --nodes={pl.nodes}"
            )
        env = {k2: v for k2, v in os.environ.items() if not k2.startswith("SLURM_") or k2 == "SLURM_CONF"}
        env.update(MEGAGROW_PLAN=self.plan_path, MEGAGROW_RUN_DIR=os.path.abspath(self.run_dir))
        if self.data:
            env["MEGAGROW_DATA"] = os.path.abspath(self.data)
        if self.overrides:  # slurm/env.sh splits MEGAGROW_RUN_ARGS on white space
            env["MEGAGROW_RUN_ARGS"] = " ".join([*shlex.split(env.get("MEGAGROW_RUN_ARGS", "")), *(f"--set={o}" for o in self.overrides)])
        cmd = ["sbatch", "--parsable", f"--dependency=afterok:{a.job_id}", f"--nodes={pl.nodes}", f"--ntasks-per-node={a.tasks_per_node}"]
        if a.gpus_per_node:
            cmd.append(f"--gpus-per-node={a.gpus_per_node}")
        if os.environ.get("SLURM_JOB_NAME"):
            cmd.append(f"--job-name={os.environ['SLURM_JOB_NAME']}")
        if os.environ.get("SLURM_SUBMIT_DIR"):
            cmd.append(f"--chdir={os.environ['SLURM_SUBMIT_DIR']}")
        cmd += shlex.split(os.environ.get("MEGAGROW_SBATCH_ARGS", ""))  # e.g. --output=..., --partition=...
        cmd.append(a.script)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    # ---- the loop
    def run(self) -> int:
        """Launch the plan's next action until the plan is done, hands off, stops or fails. Returns an exit code."""
        plan = self.plan
        self.say(
            f"plan {plan.name}: {len(plan.stages)} stages, run dir {self.run_dir}, "
            + (
                f"slurm job {self.alloc.job_id} (restart {self.alloc.restart_count}) on {','.join(self.alloc.hosts)}, "
                f"{self.alloc.tasks_per_node} ranks/node"
                if self.alloc.kind == "slurm"
                else f"local, up to {self.alloc.tasks_per_node} processes"
            )
        )
        last = None
        self.retries_left = plan.reliability.retries if self.retries is None else self.retries
        while True:
            progress = read_progress(plan, self.run_dir)
            self._note_disagreements(progress)
            act = next_action(plan, progress)
            rc = self._finish_or_stop(act, progress)
            if rc is not None:
                return rc
            k = act.stage
            stage = plan.stages[k]
            if last == (k, act.resume_step, act.kind):
                self.write_manifest(
                    "failed", {"stage_index": k, "stage": stage.name, "action": act.kind}, {"event": "no_progress", "stage": stage.name}
                )
                self.say(f"stage {stage.name} made no progress in its last launch; giving up")
                return EXIT_FAILED
            last = (k, act.resume_step, act.kind)
            pl = place(stage, self.alloc, avoid=self.avoid)
            if not pl.fits:
                return self._hand_off(act, pl)
            rc = self._after_exit(act, pl, self._launch_action(act, pl))
            if rc == "retry":
                last = None  # a retry may resume from the same checkpoint
            elif rc is not None:
                return rc

    def _note_disagreements(self, progress) -> None:
        for p in progress:  # each disagreement between a stage's records: one line, once
            if p.note and (p.name, p.note) not in self.noted:
                self.noted.add((p.name, p.note))
                self.say(f"stage {p.name} is {p.state}: {p.note}")

    def _finish_or_stop(self, act, progress) -> int | None:
        """EXIT_OK when the plan is done, EXIT_PREEMPTED when a signal asked to stop; else None."""
        plan = self.plan
        if act.kind == "done":
            self.write_manifest("done", None, {"event": "done"} if self.manifest.get("state") != "done" else None)
            self.say("plan done: " + ", ".join(f"{p.name} {p.step}/{p.steps}" for p in progress))
            return EXIT_OK
        if self.stop:
            self.write_manifest("preempted", None, {"event": "preempted", "stage": plan.stages[act.stage].name})
            self.say(f"stopping before the next launch ({act.describe(plan)}): exit {EXIT_PREEMPTED}")
            return EXIT_PREEMPTED
        return None

    def _hand_off(self, act, pl) -> int:
        """The stage needs more nodes than this job has: submit a dependent job for it and exit 0."""
        stage = self.plan.stages[act.stage]
        job = self.submit_dependent(act.stage, pl)
        self.write_manifest(
            "handed_off",
            {"stage_index": act.stage, "stage": stage.name, "action": act.kind, "next_job": job},
            {"event": "dependent_job", "stage": stage.name, "next_job": job, "nodes": pl.nodes},
        )
        self.say(
            f"stage {stage.name} needs {pl.nodes} nodes, this job has {self.alloc.nodes}: "
            f"submitted job {job} (--dependency=afterok:{self.alloc.job_id} --nodes={pl.nodes}); exit 0"
        )
        return EXIT_OK

    def _launch_action(self, act, pl) -> tuple:
        """Launch stage act.stage's ranks on placement `pl` and wait: (rc, exit event, status.json, progress)."""
        plan, k = self.plan, act.stage
        stage = plan.stages[k]
        for path in act.discard:
            self.say(f"discarding {'the incomplete checkpoints' if act.note else 'a half-written transition output'}: {path}")
            shutil.rmtree(path, ignore_errors=True)
        self.launches += 1  # persisted with the manifest below
        current = {
            "stage_index": k,
            "stage": stage.name,
            "action": act.kind,
            "layout": stage.layout.to_dict(),
            "hosts": list(pl.hosts),
            "ntasks": pl.ntasks,
            "started": round(time.time(), 3),
        }
        self.write_manifest(
            "running",
            current,
            {"event": "launch", "stage": stage.name, "action": act.kind, "from_step": act.resume_step, "hosts": list(pl.hosts)},
        )
        self.say(
            f"{act.describe(plan)} at tp {stage.layout.tp} x dp {stage.layout.dp} zero {stage.layout.zero_stage} "
            f"({pl.ntasks} ranks on {pl.nodes} node{'s' if pl.nodes > 1 else ''})"
        )
        self.last_failure = None
        rc = self.launch(k, pl)
        st = read_json(RunPaths(self.run_dir).stage(stage.name).status) or {}
        now = read_progress(plan, self.run_dir)[k]
        ev = {"event": "exit", "stage": stage.name, "rc": rc, "step": now.step}
        if self.last_failure:
            ev["failure"] = self.last_failure
        self.avoid = tuple(pl.hosts) if rc not in (EXIT_OK, EXIT_PREEMPTED) and self.alloc.kind == "slurm" else ()
        return rc, ev, st, now

    def _after_exit(self, act, pl, launched: tuple):
        """What a stage's exit means: None (go on), "retry", or the controller's exit code."""
        rc, ev, st, now = launched
        k = act.stage
        stage = self.plan.stages[k]
        if rc == EXIT_OK:
            self.write_manifest("running", None, ev)
            return None
        if rc == EXIT_PREEMPTED or (self.stop and st.get("state") == "preempted"):
            self.write_manifest("preempted", None, ev)
            self.say(f"stage {stage.name} saved at step {now.step} after a signal: exit {EXIT_PREEMPTED}")
            return EXIT_PREEMPTED
        why = f"exit {rc}" + (f": {self.last_failure}" if self.last_failure else "")
        if rc not in (EXIT_USER_ERROR, EXIT_NONFINITE) and not self.stop and self.retries_left > 0:
            self.retries_left -= 1
            self.write_manifest("running", None, {**ev, "event": "retry"})
            others = [h for h in self.alloc.hosts if h not in self.avoid] if self.avoid else []
            self.say(
                f"stage {stage.name} failed ({why}); retrying from its newest complete checkpoint "
                f"(step {now.step}; {self.retries_left} retr{'y' if self.retries_left == 1 else 'ies'} left after this one)"
                + (f", on other hosts first ({','.join(others)})" if others else "")
            )
            return "retry"
        self.write_manifest("failed", {"stage_index": k, "stage": stage.name, "action": act.kind}, ev)
        if rc == EXIT_USER_ERROR:
            self.say(f"stage {stage.name} stopped on the error above (exit 2: bad input, or a checkpoint it could not write): not retried")
        elif rc == EXIT_NONFINITE:
            self.say(f"stage {stage.name} diverged (non-finite loss or weights; exit {rc}): not retried")
        else:
            self.say(f"stage {stage.name} failed ({why})")
        return rc if rc not in (EXIT_OK, EXIT_PREEMPTED) else EXIT_FAILED
