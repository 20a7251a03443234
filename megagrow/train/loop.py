"""The stage loop: start (resume, or grow from the previous stage), train, save, stop.

Progress lives in the run directory (see megagrow/paths.py): native DeepSpeed checkpoints,
each carrying the stage record (megagrow/state/record.py); log.jsonl; status.json. The data
position is a global sample index (the record's `sample_index`), so a run resumes at the same
sample whatever its DP size. SIGUSR1/SIGTERM only set a flag; at the next step boundary all
ranks agree (folded into the step's one all-reduce), save together and exit with EXIT_PREEMPTED.
"""

from __future__ import annotations

import os
import time

import torch

from megagrow.config import Plan
from megagrow.errors import EXIT_OK, EXIT_PREEMPTED
from megagrow.fsutil import write_json_atomic
from megagrow.paths import RunPaths, tag_of
from megagrow.state.record import StageRecord
from megagrow.train.log import StageLog


def train_stage(plan: Plan, k: int, run_dir: str, stop_at: int | None = None, quiet: bool = False) -> int:
    """Train stage k of `plan` to its end (or to step `stop_at`, saving there). Returns an exit code."""
    from megagrow.data.batches import Batches, dropout_seed
    from megagrow.metrics.meter import StageMeter
    from megagrow.parallel.engine import build_stage, set_lr
    from megagrow.parallel.groups import dp_rank_size, init_distributed
    from megagrow.schedule.lr import LRSchedule
    from megagrow.schedule.stop import StageStop
    from megagrow.signals import StopFlag
    from megagrow.train.transition import initial, transition

    stage = plan.stages[k]
    paths = RunPaths(run_dir).stage(stage.name)
    stop = StopFlag()
    init_distributed(stage.layout)
    rank = torch.distributed.get_rank()
    dp_rank, dp_size = dp_rank_size()
    batches = Batches.open(plan, stage, dp_rank, dp_size)  # bad data fails before the engine is built
    grown = transition(plan, k, run_dir, quiet, keep_engine=True) if k > 0 and not paths.has_checkpoint() else None
    if not grown and stage.init_from and not paths.has_checkpoint():  # a first stage starting from a transformers model
        initial(plan, k, run_dir, quiet)
    if grown:  # train on from the grown engine: the same state a load of the checkpoint just saved gives
        (engine, optimizer), rec = grown["engine"], grown["record"]
    else:
        engine, optimizer = build_stage(plan, k)
        rec = StageRecord(plan, k)
    device = engine.device

    if not grown and paths.has_checkpoint():
        _, cs = engine.load_checkpoint(paths.ckpt)
        rec = StageRecord.from_client_state(cs, paths.ckpt)
        rec.check_resumes(plan, k)
        rec = rec.resharded(plan, k)  # this run's plan (same stage; e.g. another --data path)
        if rank == 0 and not quiet:
            print(f"[megagrow] resumed stage {stage.name} at step {rec.step} (sample {rec.sample_index})", flush=True)
    if rank == 0:
        os.makedirs(paths.root, exist_ok=True)
    sched = LRSchedule.from_optim(stage.optim, stage.steps, rec.lr_offset, rec.rewarmup)
    L = stage.layout
    end = rec.end_step if stop_at is None else min(stop_at, rec.end_step)

    def save(state: str) -> None:
        engine.save_checkpoint(paths.ckpt, tag=tag_of(rec.step), client_state=rec.to_client_state())
        if rank == 0:
            write_json_atomic(paths.status, {"state": state, "stage": stage.name, "step": rec.step, "steps": stage.steps,
                                             "sample_index": rec.sample_index, "loss": rec.loss, "tag": tag_of(rec.step),
                                             "eval_loss": rec.eval_loss, "tokens": rec.tokens, "flops": rec.flops,
                                             "layout": L.to_dict(), "time": time.time(),
                                             **({"stopped_by": stage.stop.rule} if rec.final_step is not None else {})})

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
    t_last, steps_since, eval_s = time.perf_counter(), 0, meter.eval_seconds
    engine.train()
    if stop.agreed(device):  # a signal that came during start-up
        save("preempted")
        meter.close()
        engine.destroy()
        return EXIT_PREEMPTED
    world = torch.distributed.get_world_size()
    while rec.step < end:
        lr = sched(rec.step)
        set_lr(optimizer, lr)
        first = rec.sample_index
        total = torch.zeros((), device=device)
        for j in range(L.grad_accum):
            x, y, g0 = batches.micro(first, j, device)
            engine.module.set_dropout_seed(dropout_seed(plan.seed, g0))
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            total += loss.detach().float()
        # one collective and one host sync a step: the loss summed over all ranks (TP ranks hold
        # the same value) and the stop flag (any rank signalled -> all save together)
        red = torch.stack([total, torch.tensor(1.0 if stop.raised else 0.0, device=device)])
        torch.distributed.all_reduce(red)
        loss_sum, stop_votes = red.tolist()
        rec = rec.replace(step=rec.step + 1, loss=loss_sum / (L.grad_accum * world))
        steps_since += 1
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
        if stop_votes > 0:
            save("preempted")
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
