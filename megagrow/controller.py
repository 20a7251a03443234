"""The stage controller: `megagrow run PLAN` trains a whole plan, stage after stage, each at its
own layout, locally or under Slurm, and picks up where it stopped after any interruption.

    megagrow run PLAN [--run-dir RUN]       locally: one process per rank on this machine
    sbatch slurm/staged_1b.sh               under Slurm: srun per stage inside the allocation
    megagrow status RUN [--json]            what has run, what runs now, what is left

What it does, in a loop:
  1. validate the whole plan against the machine before launching anything: configs, the growth
     chain (each stage's `grow` operator really takes the previous model to this one), the
     dataset, every layout against the allocation (see `place`); a mistake is one `error:` line
     and exit 2;
  2. read the progress in RUN (each stage's status.json and checkpoint `latest`);
  3. decide what to run next (`next_action`): train stage k (resuming from its `latest`), or
     grow stage k-1's final checkpoint into stage k (the trainer runs that transition itself at
     start-up, shard to shard, into a temporary directory renamed at the end), then train it;
  4. launch that stage with its layout: locally one process per rank (RANK/WORLD_SIZE, so each
     rank's exit code is visible), under Slurm `srun --nodes --ntasks` on the first hosts of the
     allocation, MASTER_ADDR the first of them, MASTER_PORT derived from the job id;
  5. write RUN/manifest.json (the plan and every stage's state, written last and atomically).

A stage that needs more nodes than the allocation has is not squeezed: the controller submits
the same batch script again as a dependent job (`sbatch --dependency=afterok:JOB --nodes=N`)
and exits 0; that job goes on from the manifest.

Signals: SIGUSR1/SIGTERM are forwarded to the running stage as SIGUSR1 (the ranks save at the
next step boundary and exit 75); the controller then exits 75 without starting anything new.
The batch script (slurm/env.sh) requeues the job on 75 after a signal; the restarted job runs
this same loop, which resumes from the checkpoints.

Exit codes: 0 the plan is done (or handed on to a dependent job), 2 bad input (nothing was
launched), 75 preempted (a stage saved; run again / requeue to resume), anything else a stage
failed (its ranks' exit code, 1 if none).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from megagrow.config import Plan, Stage, load_plan
from megagrow.fsutil import write_json_atomic
from megagrow.errors import EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR, UserError

EXIT_FAILED = 1
MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"  # the trainer's transition output before its final rename
STATES = ("pending", "ready", "running", "growing", "preempted", "interrupted", "done", "failed")


# --------------------------------------------------------------------------------------
# where a stage can run


@dataclass(frozen=True)
class Allocation:
    """The processes the controller may use.

    local: up to `tasks_per_node` processes on this machine (one node).
    slurm: the job's hosts, `tasks_per_node` ranks on each (GPUs per node on a GPU cluster),
    `max_nodes` the most nodes a dependent job may ask for (the partition's size), if known.
    """

    kind: str = "local"
    hosts: tuple = ("localhost",)
    tasks_per_node: int = 1
    max_nodes: Optional[int] = None
    job_id: Optional[str] = None
    restart_count: int = 0
    gpus_per_node: Optional[str] = None
    script: Optional[str] = None  # the batch script, for dependent jobs

    @property
    def nodes(self) -> int:
        return len(self.hosts)


@dataclass(frozen=True)
class Placement:
    nodes: int
    ntasks: int
    tasks_per_node: int
    hosts: tuple  # the hosts it runs on (the first `nodes` of the allocation), or () if it needs more

    @property
    def fits(self) -> bool:
        return bool(self.hosts)


def place(stage: Stage, alloc: Allocation, where: str = "") -> Placement:
    """Where stage `stage` runs in `alloc`, or a UserError if it never can.

    Rule: W = tp x dp ranks. Locally W must be <= the local process limit. Under Slurm, with G
    ranks per node: W <= G runs on one node; a larger W needs whole nodes (W % G == 0) and
    tensor-parallel groups that stay inside a node (G % tp == 0); it needs ceil(W / G) nodes,
    which must not exceed max_nodes (when known). If it needs more nodes than the allocation
    has, `fits` is False: the controller submits a dependent job with that many nodes.
    """
    L = stage.layout
    W = L.world_size
    G = alloc.tasks_per_node
    where = where or f"stage {stage.name!r}"
    if alloc.kind == "local":
        if W > G:
            raise UserError(f"{where}: layout tp {L.tp} x dp {L.dp} = {W} processes does not fit this machine "
                            f"({G} allowed locally; --max-procs raises the limit)")
        return Placement(1, W, W, alloc.hosts[:1])
    if W <= G:
        nodes, per = 1, W
    else:
        if W % G:
            raise UserError(f"{where}: layout tp {L.tp} x dp {L.dp} = {W} ranks is not a whole number of nodes "
                            f"of {G} ranks (the allocation's tasks per node)")
        if G % L.tp:
            raise UserError(f"{where}: tensor-parallel groups of tp {L.tp} would straddle nodes of {G} ranks")
        nodes, per = W // G, G
    if alloc.max_nodes is not None and nodes > alloc.max_nodes:
        raise UserError(f"{where}: layout tp {L.tp} x dp {L.dp} = {W} ranks needs {nodes} nodes of {G} ranks, "
                        f"more than the {alloc.max_nodes} the cluster has")
    hosts = tuple(alloc.hosts[:nodes]) if nodes <= alloc.nodes else ()
    return Placement(nodes, W, per, hosts)


def _slurm_hostnames(nodelist: str) -> tuple:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True).stdout
    return tuple(h for h in out.split() if h)


def _tasks_per_node(env) -> int:
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    tpn = env.get("SLURM_TASKS_PER_NODE", "")  # "2(x2),1" -> 2
    if tpn:
        return int(tpn.split(",")[0].split("(")[0])
    if env.get("SLURM_NTASKS") and env.get("SLURM_JOB_NUM_NODES"):
        return max(1, int(env["SLURM_NTASKS"]) // int(env["SLURM_JOB_NUM_NODES"]))
    return int(env.get("SLURM_CPUS_ON_NODE", "1"))


def _partition_nodes(env) -> Optional[int]:
    """Nodes in the job's partition (the most a dependent job can get), from sinfo; None if unknown."""
    try:
        cmd = ["sinfo", "-h", "-o", "%D"] + (["-p", env["SLURM_JOB_PARTITION"]] if env.get("SLURM_JOB_PARTITION") else [])
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.split()
        return sum(int(x) for x in out) or None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _local_procs() -> int:
    if shutil.which("nvidia-smi"):
        try:
            gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.count("GPU ")
            if gpus:
                return gpus
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def detect_allocation(local: bool = False, max_procs: int | None = None, max_nodes: int | None = None,
                      env=None) -> Allocation:
    """Slurm if we are inside a Slurm job (SLURM_JOB_ID) and not told `local`, else this machine.

    Local limit: one process per CPU core the process may use (one per GPU on a GPU machine),
    or --max-procs / MEGAGROW_MAX_PROCS."""
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_ID") and not local:
        hosts = _slurm_hostnames(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
        if max_nodes is None and env.get("MEGAGROW_MAX_NODES"):
            max_nodes = int(env["MEGAGROW_MAX_NODES"])
        if max_nodes is None:
            max_nodes = _partition_nodes(env)
        return Allocation("slurm", hosts, _tasks_per_node(env), max_nodes, env["SLURM_JOB_ID"],
                          int(env.get("SLURM_RESTART_COUNT") or 0), env.get("SLURM_GPUS_PER_NODE") or None,
                          env.get("MEGAGROW_SBATCH_SCRIPT") or None)
    if max_procs is None and env.get("MEGAGROW_MAX_PROCS"):
        max_procs = int(env["MEGAGROW_MAX_PROCS"])
    return Allocation("local", ("localhost",), max_procs or _local_procs())


# --------------------------------------------------------------------------------------
# validation (before anything is launched)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ds_config_exists(path: str) -> bool:
    # the trainer's rule (megagrow.parallel.engine.resolve_ds_config), without importing DeepSpeed
    return any(os.path.isfile(c) for c in (path, os.path.join(REPO_ROOT, path)))


def _data_files(prefix: str) -> list[str]:
    return [f"{prefix}.bin", f"{prefix}.idx"]


def validate_plan(plan: Plan, alloc: Allocation, run_dir: str | None = None) -> list[Placement]:
    """Every check that can fail before a launch; raises one UserError. Returns each stage's placement."""
    from megagrow.growth.ops import operator_between

    missing = [p for p in _data_files(plan.data.prefix) if not os.path.isfile(p)]
    if missing:
        raise UserError(f"dataset {plan.data.prefix!r} not found ({', '.join(missing)} missing; "
                        f"make it with tools/prepare_data.py or pass --data)")
    placements = []
    for k, stage in enumerate(plan.stages):
        where = f"stage {k} ({stage.name})"
        if k == 0 and stage.grow:
            raise UserError(f"{where}: the first stage has no previous stage to grow from (grow: {stage.grow})")
        if k > 0:
            prev = plan.stages[k - 1]
            if stage.grow is None and stage.model != prev.model:
                raise UserError(f"{where}: the model differs from stage {prev.name!r} but no `grow` operator is given")
            try:
                operator_between(stage.grow or "identity", prev.model, stage.model)
            except UserError as e:
                raise UserError(f"{where}: grow {stage.grow or 'identity'!r} from stage {prev.name!r}: {e}") from None
        if stage.layout.ds_config and not _ds_config_exists(stage.layout.ds_config):
            raise UserError(f"{where}: ds_config {stage.layout.ds_config!r} not found")
        placements.append(place(stage, alloc, where))
    if run_dir is not None:
        check_run_dir(plan, run_dir)
    return placements


def check_run_dir(plan: Plan, run_dir: str) -> None:
    """A run directory belongs to one plan: refuse to continue a run of another model chain."""
    m = read_manifest(run_dir)
    if not m:
        return
    old = m.get("plan", {}).get("stages", [])
    new = [s.to_dict() for s in plan.stages]
    for i, (a, b) in enumerate(zip(old, new)):
        for key in ("name", "model", "grow"):
            if a.get(key) != b.get(key):
                raise UserError(f"run directory {run_dir} holds a run of another plan (stage {i} {key} was "
                                f"{a.get(key)!r}, now {b.get(key)!r}); use another --run-dir")


# --------------------------------------------------------------------------------------
# progress and the decision


def stage_dir(run_dir: str, stage: Stage) -> str:
    return os.path.join(run_dir, stage.name)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def latest_tag(ckpt_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(ckpt_dir, "latest")) as f:
            tag = f.read().strip()
    except OSError:
        return None
    return tag if tag and os.path.isdir(os.path.join(ckpt_dir, tag)) else None


@dataclass
class StageProgress:
    index: int
    name: str
    state: str  # one of STATES
    step: int
    steps: int
    tokens: int
    loss: Optional[float]
    layout: dict
    checkpoint: Optional[str]  # RUN-relative path of the tag `latest` names
    grow: Optional[str]
    partial: list = field(default_factory=list)  # leftovers of an interrupted transition (discarded before a launch)


def read_progress(plan: Plan, run_dir: str) -> list[StageProgress]:
    """Each stage's state from its status.json and checkpoint directory (not from the manifest:
    the files the trainer writes are the truth, the manifest is a summary)."""
    out = []
    for k, stage in enumerate(plan.stages):
        d = stage_dir(run_dir, stage)
        ckpt = os.path.join(d, "checkpoints")
        tag = latest_tag(ckpt)
        st = _read_json(os.path.join(d, "status.json")) or {}
        partial = []
        if os.path.isdir(ckpt + PARTIAL_SUFFIX):
            partial.append(ckpt + PARTIAL_SUFFIX)
        if k > 0 and tag is None and os.path.isdir(ckpt):
            partial.append(ckpt)  # a later stage's checkpoint dir without `latest`: a half-written transition
        step = int(st.get("step", 0)) if tag else 0
        if tag is None:
            state = "pending"
        elif st.get("state") == "done" or step >= stage.steps or st.get("stopped_by"):
            state = "done"  # at its last step (saved as preempted there or not), or ended early by its stop rule
        elif st.get("state") == "preempted":
            state = "preempted"
        elif st.get("state") == "running":
            state = "interrupted"  # saved mid-stage; nothing tells that it still runs (the manifest may)
        else:
            state = "ready"  # a checkpoint without status: the transition wrote it, training has not saved yet
        L = stage.layout
        out.append(StageProgress(k, stage.name, state, step, stage.steps, step * L.global_batch * stage.model.seq_len,
                                 st.get("loss") if tag else None, L.to_dict(),
                                 os.path.join(stage.name, "checkpoints", tag) if tag else None, stage.grow, partial))
    return out


@dataclass(frozen=True)
class Action:
    """What to run next. kind: "done" | "train" (stage `stage`, from its checkpoint or from
    scratch) | "grow" (transition stage-1 -> stage, then train it)."""

    kind: str
    stage: int = -1
    resume_step: int = 0
    discard: tuple = ()  # half-written transition outputs to delete before the launch

    def describe(self, plan: Plan) -> str:
        if self.kind == "done":
            return "plan done"
        s = plan.stages[self.stage]
        if self.kind == "grow":
            prev = plan.stages[self.stage - 1]
            return f"grow {prev.name} -> {s.name} ({s.grow or 'identity'}), then train {s.name} 0/{s.steps}"
        if self.resume_step:
            return f"resume {s.name} at step {self.resume_step}/{s.steps}"
        return f"train {s.name} 0/{s.steps}"


def next_action(plan: Plan, progress: list[StageProgress]) -> Action:
    """The first stage that is not done decides. Progress in a later stage while an earlier
    one is unfinished is an inconsistent run directory (a UserError), never guessed at."""
    k = next((p.index for p in progress if p.state != "done"), None)
    if k is None:
        return Action("done")
    later = [p.name for p in progress[k + 1:] if p.checkpoint or p.state != "pending"]
    if later:
        raise UserError(f"run directory is inconsistent: stage {progress[k].name!r} is not finished but "
                        f"{', '.join(later)} already has a checkpoint")
    p = progress[k]
    if p.checkpoint is None:
        if k > 0:
            return Action("grow", k, 0, tuple(p.partial))
        return Action("train", 0, 0, tuple(p.partial))
    return Action("train", k, p.step, tuple(p.partial))


# --------------------------------------------------------------------------------------
# manifest


def read_manifest(run_dir: str) -> Optional[dict]:
    return _read_json(os.path.join(run_dir, MANIFEST))


def master_port(job_id: str | None, launch: int) -> int:
    """Under Slurm: 20000 + 10 x (job id mod 4000) + (launch number mod 10): the same for every
    rank of a launch, different for jobs that may share a node, and for consecutive launches."""
    return 20000 + 10 * (int(job_id) % 4000) + launch % 10


# --------------------------------------------------------------------------------------
# launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rc(code: int) -> int:
    return 128 - code if code < 0 else code  # Popen: -N means killed by signal N


def _clean_env(drop_slurm_step: bool = False) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(k, None)
    if drop_slurm_step:
        for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NPROCS"):
            env.pop(k, None)
    return env


class Controller:
    def __init__(self, plan: Plan, plan_path: str, run_dir: str, alloc: Allocation, data: str | None = None,
                 grace_s: float = 60.0, out=None):
        self.plan, self.plan_path, self.run_dir, self.alloc = plan, os.path.abspath(plan_path), run_dir, alloc
        self.data = data
        self.grace_s = grace_s
        self.out = out or sys.stdout
        self.stop: int | None = None
        self.procs: list[subprocess.Popen] = []
        self.launches = 0
        self.manifest = read_manifest(run_dir) or {}

    # ---- output and manifest
    def say(self, msg: str) -> None:
        print(f"[megagrow run] {msg}", file=self.out, flush=True)

    def write_manifest(self, state: str, current: dict | None = None, event: dict | None = None) -> dict:
        progress = read_progress(self.plan, self.run_dir)
        stages = [asdict(p) for p in progress]
        for s in stages:
            s.pop("partial", None)
            if current and s["index"] == current.get("stage_index") and state == "running":
                s["state"] = "growing" if current.get("action") == "grow" and s["checkpoint"] is None else "running"
            if current and s["index"] == current.get("stage_index") and state == "failed":
                s["state"] = "failed"
        events = list(self.manifest.get("events", []))
        if event:
            events.append({"time": round(time.time(), 3), **event, **self._job()})
        m = {
            "format": 1,
            "plan_file": self.plan_path,
            "plan": self.plan.to_dict(),
            "run_dir": os.path.abspath(self.run_dir),
            "state": state,
            "current": current,
            "stages": stages,
            "allocation": {"kind": self.alloc.kind, "hosts": list(self.alloc.hosts), "tasks_per_node": self.alloc.tasks_per_node,
                           "job_id": self.alloc.job_id, "restart_count": self.alloc.restart_count},
            "events": events[-200:],
            "updated": round(time.time(), 3),
        }
        os.makedirs(self.run_dir, exist_ok=True)
        write_json_atomic(os.path.join(self.run_dir, MANIFEST), m)
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
        return cmd

    def launch(self, k: int, pl: Placement) -> int:
        """Run stage k's ranks to their end; returns 0, 75 or a failure code."""
        self.launches += 1
        if self.alloc.kind == "slurm":
            return self._launch_srun(k, pl)
        return self._launch_local(k, pl)

    def _launch_local(self, k: int, pl: Placement) -> int:
        port = str(_free_port())
        self.procs = []
        for r in range(pl.ntasks):
            env = _clean_env(drop_slurm_step=True)
            env.update(RANK=str(r), WORLD_SIZE=str(pl.ntasks), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            self.procs.append(subprocess.Popen(self.train_cmd(k), env=env))
        if self.stop:
            self._forward()
        return self._wait_all()

    def _launch_srun(self, k: int, pl: Placement) -> int:
        env = _clean_env(drop_slurm_step=True)
        env.update(MASTER_ADDR=pl.hosts[0], MASTER_PORT=str(master_port(self.alloc.job_id, self.launches)))
        cmd = ["srun", f"--nodes={pl.nodes}", f"--ntasks={pl.ntasks}", f"--ntasks-per-node={pl.tasks_per_node}",
               f"--nodelist={','.join(pl.hosts)}", "--distribution=block", f"--wait={int(self.grace_s)}",
               "--kill-on-bad-exit=0", f"--job-name={self.plan.stages[k].name}"]
        if os.environ.get("SLURM_CPUS_PER_TASK"):  # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05)
            cmd.append(f"--cpus-per-task={os.environ['SLURM_CPUS_PER_TASK']}")
        cmd += self.train_cmd(k)
        self.say(f"srun on {','.join(pl.hosts)}: {pl.ntasks} ranks, MASTER_ADDR={pl.hosts[0]} MASTER_PORT={env['MASTER_PORT']}")
        self.procs = [subprocess.Popen(cmd, env=env)]
        if self.stop:
            self._forward()
        return self._wait_all()

    def _wait_all(self) -> int:
        """Wait for every process; when one fails (not 0, not 75), give the others `grace_s`
        to finish by themselves, then terminate them (a rank left alone blocks in a collective)."""
        failed_at = None
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                break
            bad = [c for c in codes if c is not None and _rc(c) not in (EXIT_OK, EXIT_PREEMPTED)]
            if bad and failed_at is None:
                failed_at = time.time()
            if failed_at is not None and time.time() - failed_at > self.grace_s:
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
        codes = [_rc(p.returncode) for p in self.procs]
        self.procs = []
        bad = [c for c in codes if c not in (EXIT_OK, EXIT_PREEMPTED)]
        if bad:
            return bad[0]
        return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else EXIT_OK

    # ---- dependent job
    def submit_dependent(self, k: int, pl: Placement) -> str:
        a = self.alloc
        if not a.script:
            raise UserError(f"stage {self.plan.stages[k].name!r} needs {pl.nodes} nodes, this job has {a.nodes}, and the "
                            f"batch script is unknown (MEGAGROW_SBATCH_SCRIPT); submit it with --nodes={pl.nodes}")
        env = {k2: v for k2, v in os.environ.items() if not k2.startswith("SLURM_") or k2 == "SLURM_CONF"}
        env.update(MEGAGROW_PLAN=self.plan_path, MEGAGROW_RUN_DIR=os.path.abspath(self.run_dir))
        if self.data:
            env["MEGAGROW_DATA"] = os.path.abspath(self.data)
        cmd = ["sbatch", "--parsable", f"--dependency=afterok:{a.job_id}", f"--nodes={pl.nodes}",
               f"--ntasks-per-node={a.tasks_per_node}"]
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
        plan = self.plan
        self.say(f"plan {plan.name}: {len(plan.stages)} stages, run dir {self.run_dir}, "
                 + (f"slurm job {self.alloc.job_id} (restart {self.alloc.restart_count}) on {','.join(self.alloc.hosts)}, "
                    f"{self.alloc.tasks_per_node} ranks/node" if self.alloc.kind == "slurm"
                    else f"local, up to {self.alloc.tasks_per_node} processes"))
        last = None
        while True:
            progress = read_progress(plan, self.run_dir)
            act = next_action(plan, progress)
            if act.kind == "done":
                self.write_manifest("done", None, {"event": "done"} if self.manifest.get("state") != "done" else None)
                self.say("plan done: " + ", ".join(f"{p.name} {p.step}/{p.steps}" for p in progress))
                return EXIT_OK
            if self.stop:
                self.write_manifest("preempted", None, {"event": "preempted", "stage": plan.stages[act.stage].name})
                self.say(f"stopping before the next launch ({act.describe(plan)}): exit {EXIT_PREEMPTED}")
                return EXIT_PREEMPTED
            k = act.stage
            stage = plan.stages[k]
            if last == (k, act.resume_step, act.kind):
                self.write_manifest("failed", {"stage_index": k, "stage": stage.name, "action": act.kind},
                                    {"event": "no_progress", "stage": stage.name})
                self.say(f"stage {stage.name} made no progress in its last launch; giving up")
                return EXIT_FAILED
            last = (k, act.resume_step, act.kind)
            pl = place(stage, self.alloc)
            if not pl.fits:
                job = self.submit_dependent(k, pl)
                self.write_manifest("handed_off", {"stage_index": k, "stage": stage.name, "action": act.kind, "next_job": job},
                                    {"event": "dependent_job", "stage": stage.name, "next_job": job, "nodes": pl.nodes})
                self.say(f"stage {stage.name} needs {pl.nodes} nodes, this job has {self.alloc.nodes}: "
                         f"submitted job {job} (--dependency=afterok:{self.alloc.job_id} --nodes={pl.nodes}); exit 0")
                return EXIT_OK
            for path in act.discard:
                self.say(f"discarding a half-written transition output: {path}")
                shutil.rmtree(path, ignore_errors=True)
            current = {"stage_index": k, "stage": stage.name, "action": act.kind, "layout": stage.layout.to_dict(),
                       "hosts": list(pl.hosts), "ntasks": pl.ntasks, "started": round(time.time(), 3)}
            self.write_manifest("running", current, {"event": "launch", "stage": stage.name, "action": act.kind,
                                                     "from_step": act.resume_step, "hosts": list(pl.hosts)})
            self.say(f"{act.describe(plan)} at tp {stage.layout.tp} x dp {stage.layout.dp} zero {stage.layout.zero_stage} "
                     f"({pl.ntasks} ranks on {pl.nodes} node{'s' if pl.nodes > 1 else ''})")
            rc = self.launch(k, pl)
            st = _read_json(os.path.join(stage_dir(self.run_dir, stage), "status.json")) or {}
            ev = {"event": "exit", "stage": stage.name, "rc": rc, "step": st.get("step")}
            if rc == EXIT_OK:
                self.write_manifest("running", None, ev)
                continue
            if rc == EXIT_PREEMPTED or (self.stop and st.get("state") == "preempted"):
                self.write_manifest("preempted", None, ev)
                self.say(f"stage {stage.name} saved at step {st.get('step')} after a signal: exit {EXIT_PREEMPTED}")
                return EXIT_PREEMPTED
            self.write_manifest("failed", {"stage_index": k, "stage": stage.name, "action": act.kind}, ev)
            if rc == EXIT_USER_ERROR:
                self.say(f"stage {stage.name} refused its input (exit 2)")
            else:
                self.say(f"stage {stage.name} failed (exit {rc})")
            return rc if rc not in (EXIT_OK, EXIT_PREEMPTED) else EXIT_FAILED


# --------------------------------------------------------------------------------------
# CLI entry points (hooked in megagrow/cli.py)


def lock_run_dir(run_dir: str):
    """One controller per run directory: an exclusive flock on RUN/.controller.lock, released when
    the process ends (however it ends). File systems without flock: no lock, no error."""
    import fcntl

    os.makedirs(run_dir, exist_ok=True)
    f = open(os.path.join(run_dir, ".controller.lock"), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"another `megagrow run` is working on {run_dir} (it holds {run_dir}/.controller.lock)") from None
    except OSError:
        pass
    return f


def run_main(args) -> int:
    """`megagrow run PLAN`: validate everything, then the loop."""
    ctl_signals = []
    # catch a preemption signal from the very start (the loop installs its own handler below)
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, lambda n, f: ctl_signals.append(n))
    plan = load_plan(args.plan)
    data = args.data
    if data:
        import dataclasses

        plan = dataclasses.replace(plan, data=plan.data.replace(prefix=data))
    run_dir = args.run_dir or os.path.join("runs", plan.name)
    alloc = detect_allocation(local=args.local, max_procs=args.max_procs, max_nodes=args.max_nodes)
    validate_plan(plan, alloc, run_dir)
    progress = read_progress(plan, run_dir)
    act = next_action(plan, progress)
    if args.dry_run:
        pls = [place(s, alloc) for s in plan.stages]
        for s, pl, p in zip(plan.stages, pls, progress):
            where = ",".join(pl.hosts) if pl.fits else f"needs {pl.nodes} nodes: dependent job"
            print(f"{s.name:12s} {p.state:11s} {p.step}/{p.steps:<7d} tp {s.layout.tp} x dp {s.layout.dp} zero "
                  f"{s.layout.zero_stage} {s.layout.dtype}: {pl.ntasks} ranks, {pl.nodes} node(s) [{where}]")
        print(f"next: {act.describe(plan)}")
        return EXIT_OK
    lock = lock_run_dir(run_dir)  # noqa: F841 - held until this process exits
    ctl = Controller(plan, args.plan, run_dir, alloc, data=data, grace_s=args.grace)
    ctl.install_signals()
    if ctl_signals:
        ctl.stop = ctl_signals[0]
    return ctl.run()


def _fmt_tokens(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def status_dict(run_dir: str) -> dict:
    m = read_manifest(run_dir)
    if not m:
        raise UserError(f"{run_dir}: no {MANIFEST} (not a run directory of `megagrow run`)")
    plan = Plan.from_dict(m["plan"], "manifest.plan")
    progress = read_progress(plan, run_dir)
    cur = m.get("current") or {}
    stages = []
    for p in progress:
        s = asdict(p)
        s.pop("partial")
        if m.get("state") == "running" and cur.get("stage_index") == p.index:
            s["state"] = "growing" if cur.get("action") == "grow" and p.checkpoint is None else "running"
        elif m.get("state") == "failed" and cur.get("stage_index") == p.index:
            s["state"] = "failed"
        stages.append(s)
    total = sum(s["tokens"] for s in stages)
    return {"run_dir": os.path.abspath(run_dir), "plan": plan.name, "plan_file": m.get("plan_file"), "state": m.get("state"),
            "current": cur or None, "allocation": m.get("allocation"), "updated": m.get("updated"), "tokens": total,
            "stages": stages, "events": m.get("events", [])[-5:]}


def status_main(args) -> int:
    d = status_dict(args.run_dir)
    if args.json:
        print(json.dumps(d, indent=1))
        return EXIT_OK
    a = d.get("allocation") or {}
    where = f"slurm job {a.get('job_id')} (restart {a.get('restart_count')})" if a.get("kind") == "slurm" else "local"
    age = time.time() - (d.get("updated") or time.time())
    print(f"run {d['run_dir']}  plan {d['plan']}  state {d['state']}  ({where}, manifest updated {age:.0f} s ago)")
    rows = [("STAGE", "STATE", "STEP", "TOKENS", "LOSS", "LAYOUT", "GROW", "CHECKPOINT")]
    for s in d["stages"]:
        L = s["layout"]
        rows.append((s["name"], s["state"], f"{s['step']}/{s['steps']}", _fmt_tokens(s["tokens"]),
                     "-" if s["loss"] is None else f"{s['loss']:.4f}",
                     f"tp{L['tp']} dp{L['dp']} zero{L['zero_stage']} {L['dtype']}", s["grow"] or "-", s["checkpoint"] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"tokens {_fmt_tokens(d['tokens'])}")
    return EXIT_OK
