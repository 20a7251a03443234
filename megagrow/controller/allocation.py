"""Where a stage can run: the allocation (this machine, or a Slurm job's hosts) and each
stage's placement in it."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from megagrow.config import Stage
from megagrow.errors import UserError


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
    max_nodes: int | None = None
    job_id: str | None = None
    restart_count: int = 0
    gpus_per_node: str | None = None
    script: str | None = None  # the batch script, for dependent jobs

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


def place(stage: Stage, alloc: Allocation, where: str = "", avoid: tuple = ()) -> Placement:
    """Where stage `stage` runs in `alloc`, or a UserError if it never can.

    Rule: W = tp x dp ranks. Locally W must be <= the local process limit. Under Slurm, with G
    ranks per node: W <= G runs on one node; a larger W needs whole nodes (W % G == 0) and
    tensor-parallel groups that stay inside a node (G % tp == 0); it needs ceil(W / G) nodes,
    which must not exceed max_nodes (when known). If it needs more nodes than the allocation
    has, `fits` is False: the controller submits a dependent job with that many nodes.

    avoid: hosts to use last (those of a launch that just failed): a retry runs on the
    allocation's other hosts where it has enough of them, else on as few avoided ones as it can.
    """
    L = stage.layout
    W = L.world_size
    G = alloc.tasks_per_node
    where = where or f"stage {stage.name!r}"
    if alloc.kind == "local":
        if W > G:
            raise UserError(
                f"{where}: layout tp {L.tp} x dp {L.dp} = {W} processes does not fit this machine "
                f"({G} allowed locally; --max-procs raises the limit)"
            )
        return Placement(1, W, W, alloc.hosts[:1])
    if W <= G:
        nodes, per = 1, W
    else:
        if W % G:
            raise UserError(
                f"{where}: layout tp {L.tp} x dp {L.dp} = {W} ranks is not a whole number of nodes "
                f"of {G} ranks (the allocation's tasks per node)"
            )
        if G % L.tp:
            raise UserError(f"{where}: tensor-parallel groups of tp {L.tp} would straddle nodes of {G} ranks")
        nodes, per = W // G, G
    if alloc.max_nodes is not None and nodes > alloc.max_nodes:
        raise UserError(
            f"{where}: layout tp {L.tp} x dp {L.dp} = {W} ranks needs {nodes} nodes of {G} ranks, "
            f"more than the {alloc.max_nodes} the cluster has"
        )
    order = [h for h in alloc.hosts if h not in avoid] + [h for h in alloc.hosts if h in avoid]
    hosts = tuple(order[:nodes]) if nodes <= alloc.nodes else ()
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


def _partition_nodes(env) -> int | None:
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


def detect_allocation(local: bool = False, max_procs: int | None = None, max_nodes: int | None = None, env=None) -> Allocation:
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
        return Allocation(
            "slurm",
            hosts,
            _tasks_per_node(env),
            max_nodes,
            env["SLURM_JOB_ID"],
            int(env.get("SLURM_RESTART_COUNT") or 0),
            env.get("SLURM_GPUS_PER_NODE") or None,
            env.get("MEGAGROW_SBATCH_SCRIPT") or None,
        )
    if max_procs is None and env.get("MEGAGROW_MAX_PROCS"):
        v = env["MEGAGROW_MAX_PROCS"].strip()
        if not v.isdigit() or int(v) < 1:
            raise UserError(f"MEGAGROW_MAX_PROCS must be an integer >= 1, got {v!r}")
        max_procs = int(v)
    return Allocation("local", ("localhost",), max_procs or _local_procs())
