"""Start-up of a stage: process groups, the stage lock and heartbeat, the data, then the engine,
optimizer and stage record, resumed from the stage's newest complete checkpoint, grown from the
previous stage's final one (megagrow/train/transition.py), or fresh; and `Started`, what start-up
hands the step loop (megagrow/train/loop.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from megagrow import collectives
from megagrow.config import Plan
from megagrow.errors import UserError
from megagrow.fsutil import Heartbeat, try_exclusive_lock
from megagrow.paths import RunPaths, StagePaths
from megagrow.state import manifest
from megagrow.state.record import StageRecord


@dataclass
class Started:
    """What start-up hands the loop: the engine, its optimizer and the stage record (resumed, grown or
    fresh), the data, and the stage's heartbeat, stop flag and lock. `end` is the step the stage ends at
    (a stop rule or --stop-at may move it earlier)."""

    plan: Plan
    k: int
    paths: StagePaths
    rank: int
    engine: object
    optimizer: object
    rec: StageRecord
    batches: object
    beat: Heartbeat
    stop: object
    lock: object  # rank 0's flock on the stage directory, held while this object lives
    quiet: bool
    end: int = 0

    @property
    def stage(self):
        return self.plan.stages[self.k]

    def ends_here(self) -> None:
        """A stop rule ended the stage at the current step."""
        self.rec = self.rec.replace(final_step=self.rec.step)
        self.end = self.rec.step

    def say(self, line: str) -> None:
        if self.rank == 0 and not self.quiet:
            print(line, flush=True)


def start_stage(plan: Plan, k: int, run_dir: str, quiet: bool = False) -> Started:
    """Start-up: process groups, the stage lock and heartbeat, the data; then the engine, optimizer and
    record, resumed from the stage's newest complete checkpoint, grown from the previous stage's, or
    fresh."""
    from megagrow.data.batches import Batches
    from megagrow.parallel.groups import dp_rank_size, init_distributed
    from megagrow.signals import StopFlag
    from megagrow.train.transition import initial, transition

    stage = plan.stages[k]
    paths = RunPaths(run_dir).stage(stage.name)
    stop = StopFlag()
    init_distributed(stage.layout, plan.reliability.collective_timeout_s)
    rank = torch.distributed.get_rank()
    lock = _stage_lock(paths.root)
    beat = Heartbeat(paths.heartbeat if rank == 0 else None)  # `megagrow run`'s hang watchdog reads it
    beat.beat(force=True)
    dp_rank, dp_size = dp_rank_size()
    batches = Batches.open(plan, stage, dp_rank, dp_size)  # bad data fails before the engine is built
    tag = _resume_tag(paths.ckpt, rank, quiet)  # the newest complete checkpoint, or None
    resuming = tag is not None
    if tag is None and k > 0:  # train on from the grown engine: the state a load of the checkpoint just saved gives
        grown = transition(plan, k, run_dir, quiet, keep_engine=True)
        (engine, optimizer), rec = grown["engine"], grown["record"]
    else:
        if tag is None and stage.init_from:  # a first stage starting from a transformers model
            initial(plan, k, run_dir, quiet)
            tag = _resume_tag(paths.ckpt, rank, True)
        if tag is None:
            from megagrow.parallel.engine import build_stage

            engine, optimizer = build_stage(plan, k)
            rec = StageRecord(plan, k)
        else:
            _check_manifest_fits(paths.ckpt, tag, plan, k)  # another plan's or stage's checkpoint: refused before loading
            engine, optimizer, rec = _resume(plan, k, paths.ckpt, tag)
            if rank == 0 and not quiet and resuming:
                print(f"[megagrow] resumed stage {stage.name} at step {rec.step} (sample {rec.sample_index})", flush=True)
    if rank == 0:
        os.makedirs(paths.root, exist_ok=True)
    return Started(plan, k, paths, rank, engine, optimizer, rec, batches, beat, stop, lock, quiet, rec.end_step)


def _resume(plan: Plan, k: int, ckpt_dir: str, tag: str) -> tuple:
    """(engine, optimizer, record) of stage k from its own checkpoint `tag`, at the same layout.

    Through the shard reader (resume.resume_engine): each rank opens the metadata file and its own
    optimizer file, memory-mapped, and fills the engine's fp32 master, Adam moments and step, module
    weights and DeepSpeed's counters from them, bitwise what engine.load_checkpoint gives
    (tests/dist/test_resume_shard.py); with verify_on_resume it checks exactly those files first
    (resume.verify_resume). DeepSpeed's loader stays the fallback for zero_stage 0, whose
    checkpoint has no ZeRO flat partitions for the shard map to address (its optimizer state is the
    torch optimizer's own state dict inside the module file)."""
    from megagrow.parallel.engine import build_stage
    from megagrow.state.checkpoint import SourceCheckpoint
    from megagrow.state.resume import resume_engine, verify_resume
    from megagrow.train.transition import gather_persistent

    L, verify = plan.stages[k].layout, plan.reliability.verify_on_resume
    where = os.path.join(ckpt_dir, tag)
    if L.zero_stage == 0:
        if verify:
            from megagrow.state.verify import verify_distributed

            verify_distributed(ckpt_dir, tag, tp=L.tp)
        engine, optimizer = build_stage(plan, k)
        try:
            _, cs = engine.load_checkpoint(ckpt_dir, tag=tag)
        except (RuntimeError, OSError, ValueError, KeyError, EOFError) as e:
            raise UserError(
                f"cannot load checkpoint {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", all_ranks=True
            ) from None
        rec = StageRecord.from_client_state(cs, ckpt_dir)
    else:
        try:
            src = SourceCheckpoint.open(ckpt_dir, tag)
        except UserError as e:
            raise UserError(f"cannot load checkpoint {where}: {e}", all_ranks=True) from None
        if verify:
            verify_resume(src, L.tp)
        try:
            engine, optimizer, rec, _ = resume_engine(plan, k, src)
        except UserError as e:
            raise UserError(f"cannot load checkpoint {where}: {e}", all_ranks=True) from None
        src.close()
        gather_persistent(engine)
    rec.check_resumes(plan, k)
    return engine, optimizer, rec.resharded(plan, k)  # this run's plan (same stage; e.g. another --data path)


def _resume_tag(ckpt_dir: str, rank: int, quiet: bool) -> str | None:
    """The newest complete checkpoint of the stage (every rank decides alike: rank 0 decides and
    broadcasts), naming the incomplete newer ones it skips."""
    box = [None, []]
    if rank == 0:
        tag, skipped = manifest.choose(ckpt_dir)
        latest = manifest.read_latest(ckpt_dir)
        if tag is None and latest is not None:
            why = "; ".join(f"{t}: {w}" for t, w in skipped[:3]) or "no tags"
            box = [
                None,
                [
                    f"error: {ckpt_dir}: `latest` names {latest!r} but no checkpoint there is complete ({why}); "
                    f"`megagrow verify {ckpt_dir}` lists them"
                ],
            ]
        else:
            box = [tag, skipped]
            if tag is not None and latest != tag:
                manifest.write_latest(ckpt_dir, tag)
    collectives.broadcast_object_list(box, src=0)
    tag, skipped = box
    if tag is None and skipped and isinstance(skipped[0], str):
        raise UserError(skipped[0][len("error: ") :], all_ranks=True)
    if rank == 0 and not quiet:
        for t, why in skipped:
            print(f"[megagrow] skipping incomplete checkpoint {t} ({why})", flush=True)
    return tag


def _check_manifest_fits(ckpt_dir: str, tag: str, plan: Plan, k: int) -> None:
    """Refuse, before loading, a checkpoint whose manifest is of another stage, model or layout."""
    m = manifest.manifest_of(ckpt_dir, tag) or {}
    stage = plan.stages[k]
    where = os.path.join(ckpt_dir, tag)
    if m.get("stage") != stage.name:
        raise UserError(
            f"{where} is a checkpoint of stage {m.get('stage')!r} (plan {m.get('plan')!r}), not of stage "
            f"{stage.name!r}; refusing to resume",
            all_ranks=True,
        )
    if "model" in m and m["model"] != stage.model.to_dict():
        raise UserError(
            f"{where} was written for another model config (plan {m.get('plan')!r}) than stage "
            f"{stage.name!r} of plan {plan.name!r} has; refusing to resume",
            all_ranks=True,
        )
    if "layout" in m and m["layout"] != stage.layout.to_dict():
        raise UserError(
            f"{where} was written at layout {m['layout']}, this run uses {stage.layout.to_dict()}: reshard it with tools/regrow.py",
            all_ranks=True,
        )


def _stage_lock(stage_root: str):
    """Rank 0 holds an exclusive flock on RUN/<stage>/.stage.lock while the stage runs: a second set of
    ranks on the same stage directory (an orphan, a second launcher) is refused. File systems
    without flock: a warning, and no lock."""
    f = None
    err = ""
    if torch.distributed.get_rank() == 0:
        os.makedirs(stage_root, exist_ok=True)
        path = StagePaths(stage_root).lock
        f, why = try_exclusive_lock(path)
        if why == "held":
            err = f"another set of ranks is training {stage_root} (it holds {path})"
        elif why:
            print(
                f"warning: {why}; nothing stops a second set of ranks from training this stage at the same time",
                file=sys.stderr,
                flush=True,
            )
    box = [err]
    collectives.broadcast_object_list(box, src=0)
    if box[0]:
        raise UserError(box[0], all_ranks=True)
    return f
