"""Process groups: torch.distributed + megatron-core parallel_state, and DeepSpeed's mpu adapter.

Rank discovery works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK) and under Slurm's srun
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID). CPU machines use gloo (DS_ACCELERATOR=cpu),
GPU machines NCCL. The groups are laid out megatron's way: TP ranks are consecutive.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings

import torch

from megagrow import collectives
from megagrow.config import Layout
from megagrow.errors import UserError

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")


def _env_rank() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or Slurm variables; (0, 1, 0) standalone."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collective_timeout_s(default: float = 600.0) -> float:
    """Seconds a collective may wait for the other ranks: MEGAGROW_COLLECTIVE_TIMEOUT_S, else `default`
    (the plan's reliability.collective_timeout_s)."""
    v = os.environ.get("MEGAGROW_COLLECTIVE_TIMEOUT_S")
    try:
        return float(v) if v else float(default)
    except ValueError:
        raise UserError(f"MEGAGROW_COLLECTIVE_TIMEOUT_S must be a number of seconds, got {v!r}") from None


def init_distributed(layout: Layout, timeout_s: float | None = None) -> None:
    """Start torch.distributed (once) and megatron-core's TP/DP groups for `layout`. Every group gets
    the collective timeout `timeout_s` (default: collective_timeout_s()): a rank that dies or hangs
    makes the others fail in bounded time instead of waiting for the 30-minute default."""
    import datetime

    import deepspeed

    from megagrow.nocompile import megatron_core

    parallel_state = megatron_core().parallel_state
    timeout = collective_timeout_s() if timeout_s is None else collective_timeout_s(timeout_s)

    rank, world, local_rank = _env_rank()
    layout.check_world(world)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    elif "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UserError("MASTER_ADDR and MASTER_PORT must be set for a multi-process run (torchrun or the megagrow controller sets them)")
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            backend = "nccl"
        else:
            backend = "gloo"
            # DeepSpeed JIT-compiles a shared-memory op (inference all-reduce only) in
            # init_distributed; training never uses it, so skip the build on CPU.
            sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=datetime.timedelta(seconds=timeout))
    collectives.setup(timeout)  # NCCL: the gloo side group for metadata (once per process)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # megatron-core's destroy only drops its references: the groups (about 17, each with its own
    # threads on gloo) stay registered with torch.distributed for the life of the process. A process
    # that lays out its groups again (a transition, a bench sweep, a test running many layouts)
    # destroys the previous layout's groups first; every engine built on them is gone by then.
    _destroy_groups(_LAYOUT_GROUPS)
    before = _registered_groups()
    # megatron-core takes minutes and builds timedelta(minutes=...): a float keeps sub-minute timeouts
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, create_gloo_process_groups=False, distributed_timeout_minutes=timeout / 60.0
    )
    _LAYOUT_GROUPS[:] = [g for g in _registered_groups() if g not in before]


_LAYOUT_GROUPS: list = []  # the process groups the last init_distributed created


def _registered_groups() -> list:
    """Every process group torch.distributed holds in this process (empty where its registry is not
    where this version of torch keeps it: then nothing is destroyed, as before)."""
    from torch.distributed import distributed_c10d as c10d

    world = getattr(c10d, "_world", None)
    return list(getattr(world, "pg_map", {}) or {})


def _destroy_groups(groups: list) -> None:
    registered = set(_registered_groups())
    for g in groups:
        if g in registered and g is not torch.distributed.group.WORLD:
            torch.distributed.destroy_process_group(g)
    groups.clear()


class MPU:
    """The model-parallel unit DeepSpeed asks for (pipeline size 1: model parallel == tensor parallel).

    Deliberately no `initialize_sequence_parallel`: when present DeepSpeed ignores the mpu's
    model-parallel group.
    """

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0


def tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def dp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
