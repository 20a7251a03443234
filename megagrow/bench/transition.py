"""`megagrow bench --transition`: the transition into stage k (save of stage k-1, grow + reshard, build +
load of stage k, its first step) beside a same-layout save + resume of stage k, each phase timed as the
slowest rank saw it. In-process work only: a real transition also starts new processes."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from megagrow import collectives
from megagrow.bench.loops import MegagrowLoop, PhaseTimer, stage_batches
from megagrow.bench.rows import free, sync_fn
from megagrow.config import Plan
from megagrow.errors import UserError
from megagrow.paths import RunPaths


class _Phases:
    """Wall time of named phases, every rank between two barriers (so: the slowest rank's)."""

    def __init__(self):
        self.s: dict[str, dict] = {"transition": {}, "resume": {}}

    def timed(self, kind: str, name: str, fn):
        collectives.barrier()
        t0 = time.perf_counter()
        out = fn()
        collectives.barrier()
        self.s[kind][name] = time.perf_counter() - t0
        return out


def _shared_tmpdir() -> str:
    """A scratch folder made by rank 0, its path on every rank."""
    obj = [tempfile.mkdtemp(prefix="megagrow-bench-") if torch.distributed.get_rank() == 0 else None]
    collectives.broadcast_object_list(obj, src=0)
    return obj[0]


def _save(engine, plan: Plan, i: int, ckpt: str) -> None:
    from megagrow.state import manifest
    from megagrow.state.record import StageRecord

    manifest.save_record(engine, ckpt, StageRecord(plan, i, step=1))


def _transition_path(plan: Plan, k: int, root: str, synthetic: bool, ph: _Phases) -> None:
    """Stage k-1 one step and saved; grown + resharded into stage k; built, loaded, one step."""
    from megagrow.parallel.groups import init_distributed
    from megagrow.train.transition import transition as do_transition

    ckpt = lambda i: RunPaths(root).stage(plan.stages[i].name).ckpt  # noqa: E731
    init_distributed(plan.stages[k - 1].layout)
    lp = MegagrowLoop(plan, k - 1, synthetic, PhaseTimer(lambda: None, False))
    lp.step()
    ph.timed("transition", "save", lambda: _save(lp.engine, plan, k - 1, ckpt(k - 1)))
    lp.close()
    free(lp.device)
    init_distributed(plan.stages[k].layout)
    ph.timed("transition", "grow_reshard", lambda: do_transition(plan, k, root, quiet=True))
    eng = ph.timed("transition", "build_load", lambda: _build_load(plan, k, ckpt(k)))
    ph.timed("transition", "first_step", lambda: _first_step(eng, plan, k, synthetic))
    eng.destroy()


def _resume_path(plan: Plan, k: int, root: str, synthetic: bool, ph: _Phases) -> None:
    """Stage k one step and saved; built, loaded, one step: what a restart at the same layout costs."""
    lp = MegagrowLoop(plan, k, synthetic, PhaseTimer(lambda: None, False))
    lp.step()
    rdir = os.path.join(root, "resume")
    ph.timed("resume", "save", lambda: _save(lp.engine, plan, k, rdir))
    lp.close()
    eng = ph.timed("resume", "build_load", lambda: _build_load(plan, k, rdir))
    ph.timed("resume", "first_step", lambda: _first_step(eng, plan, k, synthetic))
    eng.destroy()


def bench_transition(plan: Plan, k: int, synthetic: bool) -> dict:
    """Transition into stage k (save k-1, grow + reshard, build + load k, first step) vs a
    same-layout save + resume of stage k, each phase timed (slowest rank)."""
    if k < 1:
        raise UserError("--transition needs a stage that grows from a previous one (--stage 1 or later)")
    prev, stage = plan.stages[k - 1], plan.stages[k]
    if prev.layout.world_size != stage.layout.world_size:
        raise UserError(
            f"--transition runs both stages in one launch: stage {prev.name!r} needs {prev.layout.world_size} "
            f"processes, {stage.name!r} {stage.layout.world_size}"
        )
    root = _shared_tmpdir()
    # the source stage ends at its first step: transition() checks it is finished
    src_plan = plan.replace(stages=tuple(s.replace(steps=1) if i == k - 1 else s for i, s in enumerate(plan.stages)))
    ph = _Phases()
    try:
        _transition_path(src_plan, k, root, synthetic, ph)
        _resume_path(src_plan, k, root, synthetic, ph)
    finally:
        collectives.barrier()
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(root, ignore_errors=True)
    t_tr, t_rs = sum(ph.s["transition"].values()), sum(ph.s["resume"].values())
    return {
        "from": prev.name,
        "to": stage.name,
        "grow": stage.grow,
        "transition_s": ph.s["transition"],
        "resume_s": ph.s["resume"],
        "transition_total_s": t_tr,
        "resume_total_s": t_rs,
        "ratio": t_tr / t_rs,
        "params_from": prev.model.num_params(),
        "params_to": stage.model.num_params(),
    }


def _build_load(plan: Plan, k: int, ckpt: str):
    from megagrow.parallel.engine import build_stage as build

    engine, _ = build(plan, k)
    engine.load_checkpoint(ckpt)
    return engine


def _first_step(engine, plan: Plan, k: int, synthetic: bool):
    """The trainer's step (train_step) at step 0, on an engine just built or grown."""
    from megagrow.parallel.groups import dp_rank_size
    from megagrow.schedule.lr import LRSchedule
    from megagrow.train.step import train_step

    stage = plan.stages[k]
    dp_rank, dp_size = dp_rank_size()
    b = stage_batches(plan, stage, dp_rank, dp_size, synthetic)
    engine.train()
    train_step(
        engine,
        engine.optimizer,
        b,
        plan.seed,
        stage.layout.grad_accum,
        0,
        LRSchedule.from_optim(stage.optim, stage.steps)(0),
        engine.device,
    )
    sync_fn(engine.device)()
