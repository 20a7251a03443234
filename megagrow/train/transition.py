"""Stage k-1's final checkpoint -> stage k's first, grown and resharded shard to shard; or, for a
first stage with `init_from: hf:PATH`, a transformers model -> its first checkpoint (`initial`).

The output is written under `checkpoints.partial/` and renamed to `checkpoints/` once every
rank's files are written: an interrupted transition never leaves a half-written stage
directory (the controller discards the leftovers and the transition runs again).
"""

from __future__ import annotations

import os
import shutil
import time

import torch

from megagrow import collectives, faults
from megagrow.config import Plan
from megagrow.errors import UserError
from megagrow.paths import RunPaths
from megagrow.state import manifest


def _seal(tmp: str, plan: Plan, k: int, info: dict, **extra) -> None:
    """A transition's (or import's) output counts only once sealed, like a training save."""
    stage = plan.stages[k]
    manifest.seal(
        tmp,
        info["tag"],
        manifest.checkpoint_meta(plan, k, info["step"], info["sample_offset"] + info["step"] * stage.layout.global_batch, **extra),
        tp=stage.layout.tp,
    )


def gather_persistent(engine) -> None:
    """ZeRO-3 keeps the parameters below `stage3_param_persistence_threshold` (DeepSpeed's default:
    1e5 elements; ds_configs/cpu.json sets 0) whole on every rank, outside the gather/release of
    each forward. A grown engine's partitions are filled and then copied into the module
    (executor.sync_module_weights), but those whole copies were gathered when the engine was saved,
    from partitions not yet written (the engine is built without initialising its weights): the
    first forward, the eval at growth, would read garbage (NaN). Release them and gather them again
    from the partitions now, as a checkpoint load does (DeepSpeed's all_gather skips a parameter it
    holds whole). Collective over the data-parallel group; nothing to do below ZeRO-3."""
    persistent = getattr(engine.optimizer, "persistent_parameters", None)
    if persistent:
        persistent[0].partition(persistent)
        persistent[0].all_gather(persistent)


def transition(plan: Plan, k: int, run_dir: str, quiet: bool = False, keep_engine: bool = False) -> dict:
    """Grow stage k-1's final checkpoint into stage k's first (saved in stage k's checkpoints).
    keep_engine: also return the grown engine, ready to train (see executor.regrow)."""
    from megagrow.state.checkpoint import SourceCheckpoint
    from megagrow.state.executor import regrow

    prev, stage = plan.stages[k - 1], plan.stages[k]
    run = RunPaths(run_dir)
    prev_paths, paths = run.stage(prev.name), run.stage(stage.name)
    src_tag, _ = manifest.choose_once(prev_paths.ckpt)  # rank 0 chooses, every rank gets its choice
    if src_tag is None:
        raise UserError(
            f"stage {stage.name!r} starts from stage {prev.name!r}, which has no complete checkpoint in {prev_paths.ckpt}", all_ranks=True
        )
    src = SourceCheckpoint.open(prev_paths.ckpt, src_tag)
    rec = src.record
    if not rec.finished:
        raise UserError(f"stage {prev.name!r} is at step {rec.step} of {rec.end_step}: finish it first")
    t0 = time.perf_counter()
    rank = torch.distributed.get_rank()
    if rank == 0 and not quiet:
        print(f"[megagrow] transition {prev.name} -> {stage.name} ({stage.grow or 'identity'}): start", flush=True)
    tmp = paths.partial
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    collectives.barrier()
    # each rank checks the checksums of exactly the source files it opens (verify_on_resume); ends with a
    # barrier: every rank's files are written
    info = regrow(plan, k, src, tmp, keep_engine=keep_engine, verify=plan.reliability.verify_on_resume)
    src.close()
    if keep_engine:
        gather_persistent(info["engine"][0])
    faults.point("transition.regrown", 0)
    _seal(tmp, plan, k, info, source=f"{prev_paths.ckpt}/{src.tag}")
    faults.point("transition.sealed", 0)
    if rank == 0:
        shutil.rmtree(paths.ckpt, ignore_errors=True)  # no `latest` there (else no transition): leftovers only
        os.replace(tmp, paths.ckpt)
    collectives.barrier()
    if rank == 0 and not quiet:
        print(
            f"[megagrow] transition {prev.name} -> {stage.name} ({info['op']}) at {stage.layout.to_dict()} "
            f"in {time.perf_counter() - t0:.1f} s, read {info['bytes_read'] / 1e6:.2f} MB from {info['files_opened']} files "
            f"on rank 0",
            flush=True,
        )
    return info


def initial(plan: Plan, k: int, run_dir: str, quiet: bool = False) -> dict:
    """Stage k's step-0 checkpoint from the transformers model its `init_from: hf:PATH` names
    (weights only, fresh optimizer state, at the stage's layout), written like a transition's.
    A missing or mismatching model is a UserError before anything is written."""
    from megagrow.hf import import_checkpoint

    stage = plan.stages[k]
    paths = RunPaths(run_dir).stage(stage.name)
    t0 = time.perf_counter()
    rank = torch.distributed.get_rank()
    tmp = paths.partial
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    collectives.barrier()
    info = import_checkpoint(plan, k, tmp)  # checks the model first; ends with a barrier
    _seal(tmp, plan, k, {"tag": info["tag"], "step": 0, "sample_offset": 0}, source=info["init_from"])
    if rank == 0:
        shutil.rmtree(paths.ckpt, ignore_errors=True)
        os.replace(tmp, paths.ckpt)
    collectives.barrier()
    if rank == 0 and not quiet:
        print(
            f"[megagrow] {stage.name}: initialised from {info['init_from']} at {stage.layout.to_dict()} "
            f"in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    return info
