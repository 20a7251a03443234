"""The stage loop: start (resume, or grow from the previous stage), train, save, stop.

Progress lives in the run directory (see megagrow/paths.py): native DeepSpeed checkpoints,
each carrying the stage record (megagrow/state/record.py); log.jsonl; status.json. The data
position is a global sample index (the record's `sample_index`), so a run resumes at the same
sample whatever its DP size. SIGUSR1/SIGTERM only set a flag; at the next step boundary all
ranks agree (folded into the step's one all-reduce), save together and exit with EXIT_PREEMPTED.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

from megagrow import collectives, faults
from megagrow.config import Plan
from megagrow.errors import EXIT_OK, EXIT_PREEMPTED, NonFinite, UserError
from megagrow.state import manifest
from megagrow.fsutil import Heartbeat, try_exclusive_lock, write_json_atomic
from megagrow.paths import RunPaths, StagePaths, tag_of
from megagrow.state.record import StageRecord
from megagrow.train.log import StageLog
from megagrow.train.step import train_step


def train_stage(plan: Plan, k: int, run_dir: str, stop_at: int | None = None, quiet: bool = False) -> int:
    """Train stage k of `plan` to its end (or to step `stop_at`, saving there). Returns an exit code."""
    from megagrow.data.batches import Batches
    from megagrow.metrics.meter import StageMeter
    from megagrow.parallel.engine import build_stage
    from megagrow.parallel.groups import dp_rank_size, init_distributed
    from megagrow.schedule.lr import LRSchedule
    from megagrow.schedule.stop import StageStop
    from megagrow.signals import StopFlag
    from megagrow.train.transition import initial, transition

    stage = plan.stages[k]
    rel = plan.reliability
    paths = RunPaths(run_dir).stage(stage.name)
    stop = StopFlag()
    init_distributed(stage.layout, rel.collective_timeout_s)
    rank = torch.distributed.get_rank()
    lock = _stage_lock(paths.root)  # noqa: F841 - held (rank 0) until this process ends
    beat = Heartbeat(paths.heartbeat if rank == 0 else None)  # `megagrow run`'s hang watchdog reads its age
    beat.beat(force=True)
    dp_rank, dp_size = dp_rank_size()
    batches = Batches.open(plan, stage, dp_rank, dp_size)  # bad data fails before the engine is built
    tag = _resume_tag(paths.ckpt, rank, quiet)  # the newest complete checkpoint, or None
    resuming = tag is not None
    grown = None
    if tag is None and k > 0:
        grown = transition(plan, k, run_dir, quiet, keep_engine=True)
        tag = _resume_tag(paths.ckpt, rank, True)
    elif tag is None and stage.init_from:  # a first stage starting from a transformers model
        initial(plan, k, run_dir, quiet)
        tag = _resume_tag(paths.ckpt, rank, True)
    if tag is not None and not grown:
        _check_manifest_fits(paths.ckpt, tag, plan, k)  # another plan's or stage's checkpoint: refused before loading
        if rel.verify_on_resume:
            manifest.verify_distributed(paths.ckpt, tag, tp=stage.layout.tp)
    if grown:  # train on from the grown engine: the same state a load of the checkpoint just saved gives
        (engine, optimizer), rec = grown["engine"], grown["record"]
    else:
        engine, optimizer = build_stage(plan, k)
        rec = StageRecord(plan, k)
    device = engine.device

    if tag is not None and not grown:
        try:
            _, cs = engine.load_checkpoint(paths.ckpt, tag=tag)
        except (RuntimeError, OSError, ValueError, KeyError, EOFError) as e:
            raise UserError(f"cannot load checkpoint {os.path.join(paths.ckpt, tag)}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}", all_ranks=True) from None
        rec = StageRecord.from_client_state(cs, paths.ckpt)
        rec.check_resumes(plan, k)
        rec = rec.resharded(plan, k)  # this run's plan (same stage; e.g. another --data path)
        if rank == 0 and not quiet and resuming:
            print(f"[megagrow] resumed stage {stage.name} at step {rec.step} (sample {rec.sample_index})", flush=True)
    if rank == 0:
        os.makedirs(paths.root, exist_ok=True)
    sched = LRSchedule.from_optim(stage.optim, stage.steps, rec.lr_offset, rec.rewarmup)
    L = stage.layout
    end = rec.end_step if stop_at is None else min(stop_at, rec.end_step)

    def save(state: str) -> None:
        # never a checkpoint with non-finite weights: the last complete one stays the newest
        if not fp32_finite(optimizer):
            raise NonFinite(f"stage {stage.name}: the weights are not finite at step {rec.step}; not saving it "
                            f"({_kept_msg(paths.ckpt)})")
        faults.set_step(rec.step)
        faults.point("save.before")
        manifest.save_record(engine, paths.ckpt, rec, keep_last=rel.keep_last)
        faults.point("save.after")
        if rank == 0:
            write_json_atomic(paths.status, {"state": state, "stage": stage.name, "step": rec.step, "steps": stage.steps,
                                             "sample_index": rec.sample_index, "loss": rec.loss, "tag": tag_of(rec.step),
                                             "eval_loss": rec.eval_loss, "tokens": rec.tokens, "flops": rec.flops,
                                             "layout": L.to_dict(), "time": time.time(),
                                             **({"stopped_by": stage.stop.rule} if rec.final_step is not None else {})})

    faults.arm(engine)
    log = StageLog(paths.log, rec.step, active=rank == 0)
    # the ledger (tokens, FLOPs) goes on from the record; evals on the held-out split; TensorBoard events
    meter = StageMeter(plan, k, rec.tokens_offset, rec.flops_offset, device, rank, paths.root, quiet)
    # stop: {rule: slope} (None: the stage ends at `steps`), on the periodic eval loss when there is one
    stopper = StageStop.of(plan, k, rec.lr_offset, paths.log, rec.step, use_eval=meter.enabled and stage.eval_every > 0)

    def evaluate(at: str, value: float | None = None) -> float:
        nonlocal rec
        v = meter.evaluate(engine) if value is None else value  # every rank: eval mode, no grad; data and RNGs untouched
        rec = rec.replace(eval_loss=v)
        entry = meter.eval_record(rec.step, v, at)
        log.write(entry)
        meter.write(entry)
        if rank == 0 and not quiet and at != "after_growth":
            print(f"[megagrow] {stage.name} step {rec.step} eval loss {v:.4f} ({at})", flush=True)
        return v

    if k > 0 and rec.step == 0 and meter.enabled:  # just grown: the loss before (the source's final eval) and after
        before = rec.eval_loss if meter.comparable_before() else None
        if before is not None:
            entry = meter.eval_record(0, before, "before_growth")
            log.write(entry)
            meter.write(entry)
        evaluate("after_growth")
        if rank == 0 and not quiet:
            print(growth_report(plan, k, before, rec.eval_loss), flush=True)
        if not math.isfinite(rec.eval_loss):  # the same value on every rank (all-reduced): all stop alike
            was = "" if before is None else f", {before:.4f} before it"
            raise NonFinite(f"stage {stage.name}: eval loss {rec.eval_loss} right after growth {plan.stages[k - 1].name} -> "
                            f"{stage.name} ({stage.grow or 'identity'}{was}); stopped before training ({_kept_msg(paths.ckpt)})")
    t_last, steps_since, eval_s = time.perf_counter(), 0, meter.eval_seconds
    engine.train()
    if stop.agreed(device):  # a signal that came during start-up
        save("preempted")
        meter.close()
        engine.destroy()
        return EXIT_PREEMPTED
    world = torch.distributed.get_world_size()
    nonfinite = 0
    beat.beat(force=True)  # built, resumed or grown: start-up is over
    while rec.step < end:
        lr = sched(rec.step)
        total = train_step(engine, optimizer, batches, plan.seed, L.grad_accum, rec.sample_index, lr, device)
        # one collective and one host sync a step: the loss summed over all ranks (TP ranks hold
        # the same value), the stop flag (any rank signalled -> all save together) and whether the
        # gradient norm was finite
        red = torch.stack([total, torch.tensor(1.0 if stop.raised else 0.0, device=device), _grad_norm_bad(engine, device)])
        collectives.all_reduce(red)
        loss_sum, stop_votes, grad_bad = red.tolist()
        rec = rec.replace(step=rec.step + 1, loss=loss_sum / (L.grad_accum * world))
        steps_since += 1
        beat.beat()
        faults.point("step", rec.step)
        if not math.isfinite(loss_sum) or grad_bad > 0:
            nonfinite += 1
            what = f"loss {rec.loss}" if not math.isfinite(loss_sum) else "gradient norm not finite"
            if nonfinite > rel.skip_nonfinite_steps or not fp32_finite(optimizer):
                raise NonFinite(f"stage {stage.name}: {what} at step {rec.step} (lr {lr:.3g})"
                                + (f", {nonfinite} such steps (skip_nonfinite_steps {rel.skip_nonfinite_steps})" if nonfinite > 1 else "")
                                + f"; stopped without saving ({_kept_msg(paths.ckpt)}); lower optim.lr or check the data")
            if rank == 0:
                print(f"[megagrow] {stage.name}: {what} at step {rec.step}: update skipped, weights finite "
                      f"({nonfinite} of {rel.skip_nonfinite_steps} allowed)", flush=True)
        logged = rec.step % stage.log_every == 0 or rec.step == end
        if stopper and logged and stopper.update(rec.step, rec.loss):
            rec = rec.replace(final_step=rec.step)  # the slope rule fired on the logged loss: the stage ends here
            end = rec.step
            if rank == 0 and not quiet:
                print(f"[megagrow] {stage.name}: slope rule (d log L / d log C {stopper.rule.slope:.4f} > "
                      f"{stopper.threshold}) ends the stage at step {rec.step}", flush=True)
        if rank == 0 and logged:
            now = time.perf_counter()
            dt = (now - t_last - (meter.eval_seconds - eval_s)) / steps_since  # training time only, evals excluded
            entry = {"stage": stage.name, "step": rec.step, "loss": rec.loss, "lr": lr, "sample_index": rec.sample_index,
                     "tokens_per_s": L.global_batch * stage.model.seq_len / dt, "step_time_s": dt,
                     "grad_norm": _grad_norm(engine), **meter.train_fields(rec.step, dt), "time": time.time()}
            log.write(entry)
            meter.write(entry)
            if not quiet:
                mfu = "" if entry["mfu"] is None else f" MFU {100 * entry['mfu']:.1f}%"
                print(f"[megagrow] {stage.name} step {rec.step}/{stage.steps} loss {rec.loss:.4f} lr {lr:.2e} "
                      f"{entry['tokens_per_s']:.0f} tok/s {entry['tflops_per_device']:.3g} TFLOP/s/dev{mfu}", flush=True)
            t_last, steps_since, eval_s = now, 0, meter.eval_seconds
        if rec.finished and meter.enabled:
            evaluate("stage_end")  # before the save, so the checkpoint carries it (the next stage's "before growth")
        elif meter.periodic_due(rec.step, rec.finished):
            v = evaluate("periodic")
            if stopper and stopper.update_eval(rec.step, v):  # the slope rule on the validation loss
                rec = rec.replace(final_step=rec.step)
                end = rec.step
                if rank == 0 and not quiet:
                    print(f"[megagrow] {stage.name}: slope rule on the eval loss (d log L / d log C {stopper.rule.slope:.4f} > "
                          f"{stopper.threshold}) ends the stage at step {rec.step}", flush=True)
                evaluate("stage_end", v)  # the same model: its stage-end record, not a second eval
        if stop_votes > 0:  # a signal at the stage's last step still leaves it done: say so
            save("done" if rec.finished else "preempted")
            meter.close()
            if rank == 0 and not quiet:
                print(f"[megagrow] signal received: saved stage {stage.name} at step {rec.step}, exiting {EXIT_PREEMPTED}", flush=True)
            engine.destroy()
            return EXIT_PREEMPTED
        if rec.step % stage.save_every == 0 or rec.step == end:
            save("done" if rec.finished else "running")
    log.close()
    meter.close()
    if rank == 0 and not quiet:
        print(f"[megagrow] stage {stage.name} at step {rec.step}: checkpoint {os.path.join(paths.ckpt, tag_of(rec.step))}", flush=True)
    engine.destroy()  # frees the engine's buffers and hooks now (a process may train several stages)
    return EXIT_OK


def _grad_norm_bad(engine, device) -> torch.Tensor:
    """1.0 if this step's global gradient norm is not finite (as a tensor: no host sync), else 0.0."""
    g = engine.get_global_grad_norm()
    if g is None:
        return torch.zeros((), device=device)
    g = torch.as_tensor(g, device=device, dtype=torch.float32)
    return (~torch.isfinite(g)).float().reshape(())


def fp32_finite(optimizer) -> bool:
    """Every rank's fp32 master partition is finite (collective)."""
    from megagrow.state.executor import fp32_partitions

    try:
        tensors = fp32_partitions(optimizer)
    except RuntimeError:  # no ZeRO flat partitions (zero_stage 0): the optimizer's own parameters
        tensors = [p for g in optimizer.param_groups for p in g["params"]]
    ok = all(bool(torch.isfinite(t).all()) for t in tensors)
    t = torch.tensor([1.0 if ok else 0.0])  # on the CPU: collectives puts it where the backend needs it
    collectives.all_reduce(t, op="min")
    return bool(t.item() > 0)


def _kept_msg(ckpt_dir: str) -> str:
    tags = manifest.complete_tags(ckpt_dir)
    return f"the last complete checkpoint {tags[0]} is kept" if tags else "no complete checkpoint of this stage yet"


def _resume_tag(ckpt_dir: str, rank: int, quiet: bool) -> str | None:
    """The newest complete checkpoint of the stage (every rank decides alike: rank 0 decides and
    broadcasts), naming the incomplete newer ones it skips."""
    box = [None, []]
    if rank == 0:
        tag, skipped = manifest.choose(ckpt_dir)
        latest = manifest.read_latest(ckpt_dir)
        if tag is None and latest is not None:
            why = "; ".join(f"{t}: {w}" for t, w in skipped[:3]) or "no tags"
            box = [None, [f"error: {ckpt_dir}: `latest` names {latest!r} but no checkpoint there is complete ({why}); "
                          f"`megagrow verify {ckpt_dir}` lists them"]]
        else:
            box = [tag, skipped]
            if tag is not None and latest != tag:
                manifest.write_latest(ckpt_dir, tag)
    collectives.broadcast_object_list(box, src=0)
    tag, skipped = box
    if tag is None and skipped and isinstance(skipped[0], str):
        raise UserError(skipped[0][len("error: "):], all_ranks=True)
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
        raise UserError(f"{where} is a checkpoint of stage {m.get('stage')!r} (plan {m.get('plan')!r}), not of stage "
                        f"{stage.name!r}; refusing to resume", all_ranks=True)
    if "model" in m and m["model"] != stage.model.to_dict():
        raise UserError(f"{where} was written for another model config (plan {m.get('plan')!r}) than stage "
                        f"{stage.name!r} of plan {plan.name!r} has; refusing to resume", all_ranks=True)
    if "layout" in m and m["layout"] != stage.layout.to_dict():
        raise UserError(f"{where} was written at layout {m['layout']}, this run uses {stage.layout.to_dict()}: "
                        f"reshard it with tools/regrow.py", all_ranks=True)


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
            print(f"warning: {why}; nothing stops a second set of ranks from training this stage at the same time",
                  file=sys.stderr, flush=True)
    box = [err]
    collectives.broadcast_object_list(box, src=0)
    if box[0]:
        raise UserError(box[0], all_ranks=True)
    return f


def _grad_norm(engine) -> float | None:
    g = engine.get_global_grad_norm()
    return None if g is None else float(g)


EXACT_TOLERANCE = 1e-4  # |eval after - eval before| of a loss-preserving operator in fp32 above this: a warning


def growth_report(plan: Plan, k: int, before: float | None, after: float) -> str:
    """The line printed when stage k has grown from stage k-1, and a warning when a loss-preserving
    operator moved the eval loss (fp32) by more than EXACT_TOLERANCE, naming the grown tensor kinds."""
    from megagrow.growth.ops import logical_tensors, operator_between

    prev, stage = plan.stages[k - 1], plan.stages[k]
    if before is None:
        return f"[megagrow] eval loss after growth {prev.name} -> {stage.name}: {after:.4f} (no comparable eval before it)"
    delta = after - before
    line = f"[megagrow] eval loss at growth {prev.name} -> {stage.name}: {before:.4f} -> {after:.4f} (delta {delta:.1e})"
    try:
        exact = operator_between(stage.grow or "identity", prev.model, stage.model).exact
    except Exception:  # noqa: BLE001 - a report line must not fail the stage
        exact = False
    if exact and abs(delta) > EXACT_TOLERANCE and stage.layout.dtype == "fp32":
        old, new = logical_tensors(prev.model), logical_tensors(stage.model)
        kinds = sorted({n.split(".", 2)[2] if n.startswith("blocks.") else n for n, s in new.items() if old.get(n) != s})
        line += (f"\n[megagrow] WARNING: {stage.grow or 'identity'} is loss preserving but the eval loss moved by "
                 f"{delta:+.2e} (> {EXACT_TOLERANCE:.0e}); grown tensor kinds: {', '.join(kinds)}")
    return line
