"""The stage loop: start (resume, or grow from the previous stage), train, save, stop.

Start-up (the stage lock, the data, the engine resumed, grown or fresh) is megagrow/train/start.py;
this module runs the stage from there. Progress lives in the run directory (see megagrow/paths.py):
native DeepSpeed checkpoints, each carrying the stage record (megagrow/state/record.py); log.jsonl;
status.json. The data position is a global sample index (the record's `sample_index`), so a run
resumes at the same sample whatever its DP size. SIGUSR1/SIGTERM only set a flag; at the next step
boundary all ranks agree (folded into the step's one all-reduce), save together and exit with
EXIT_PREEMPTED.
"""

from __future__ import annotations

import math
import os
import time

import torch

from megagrow import collectives, faults
from megagrow.config import Plan
from megagrow.errors import EXIT_OK, EXIT_PREEMPTED, NonFinite
from megagrow.fsutil import write_json_atomic
from megagrow.paths import tag_of
from megagrow.state import manifest
from megagrow.train.log import StageLog
from megagrow.train.start import Started, start_stage
from megagrow.train.step import train_step


def train_stage(plan: Plan, k: int, run_dir: str, stop_at: int | None = None, quiet: bool = False) -> int:
    """Train stage k of `plan` to its end (or to step `stop_at`, saving there). Returns an exit code."""
    return run_stage(start_stage(plan, k, run_dir, quiet), stop_at)


class Checkpointer:
    """Saves: every `save_every` steps and at the stage's end; at once when a signal was agreed."""

    def __init__(self, s: Started):
        self.s = s

    def save(self, state: str) -> None:
        """A sealed checkpoint of the current step, then status.json; never one with non-finite weights
        (the last complete one stays the newest)."""
        s, rec, stage = self.s, self.s.rec, self.s.stage
        if not fp32_finite(s.optimizer):
            raise NonFinite(f"stage {stage.name}: the weights are not finite at step {rec.step}; not saving it ({_kept_msg(s.paths.ckpt)})")
        faults.set_step(rec.step)
        faults.point("save.before")
        manifest.save_record(s.engine, s.paths.ckpt, rec, keep_last=s.plan.reliability.keep_last)
        faults.point("save.after")
        if s.rank == 0:
            write_json_atomic(
                s.paths.status,
                {
                    "state": state,
                    "stage": stage.name,
                    "step": rec.step,
                    "steps": stage.steps,
                    "sample_index": rec.sample_index,
                    "loss": rec.loss,
                    "tag": tag_of(rec.step),
                    "eval_loss": rec.eval_loss,
                    "tokens": rec.tokens,
                    "flops": rec.flops,
                    "layout": stage.layout.to_dict(),
                    "time": time.time(),
                    **({"stopped_by": stage.stop.rule} if rec.final_step is not None else {}),
                },
            )

    def preempted(self, meter: Meter, state: str, said: bool = True) -> int:
        """Save now (a signal was agreed) with status `state`, close, and return EXIT_PREEMPTED."""
        s = self.s
        self.save(state)
        meter.meter.close()
        if said:
            s.say(f"[megagrow] signal received: saved stage {s.stage.name} at step {s.rec.step}, exiting {EXIT_PREEMPTED}")
        s.engine.destroy()
        return EXIT_PREEMPTED

    def due(self) -> bool:
        return self.s.rec.step % self.s.stage.save_every == 0 or self.s.rec.step == self.s.end


class Meter:
    """The stage's log.jsonl, TensorBoard and held-out evals: logs every `log_every` steps (training time
    per step, evals excluded), evaluates when the stage's meter says so."""

    def __init__(self, s: Started):
        from megagrow.metrics.meter import StageMeter

        rec = s.rec
        self.s = s
        self.log = StageLog(s.paths.log, rec.step, active=s.rank == 0)
        # the ledger (tokens, FLOPs) goes on from the record; evals on the held-out split; TensorBoard events
        self.meter = StageMeter(s.plan, s.k, rec.tokens_offset, rec.flops_offset, s.engine.device, s.rank, s.paths.root, s.quiet)
        self.t_last, self.steps_since, self.eval_s = time.perf_counter(), 0, self.meter.eval_seconds

    def write(self, entry: dict) -> None:
        self.log.write(entry)
        self.meter.write(entry)

    def evaluate(self, at: str, value: float | None = None) -> float:
        s = self.s
        v = self.meter.evaluate(s.engine) if value is None else value  # every rank: eval mode, no grad; data and RNGs untouched
        s.rec = s.rec.replace(eval_loss=v)
        self.write(self.meter.eval_record(s.rec.step, v, at))
        if at != "after_growth":
            s.say(f"[megagrow] {s.stage.name} step {s.rec.step} eval loss {v:.4f} ({at})")
        return v

    def at_growth(self) -> None:
        """Just grown (stage k > 0 at step 0): the eval loss before (the source's final eval) and after."""
        s, stage = self.s, self.s.stage
        before = s.rec.eval_loss if self.meter.comparable_before() else None
        if before is not None:
            self.write(self.meter.eval_record(0, before, "before_growth"))
        self.evaluate("after_growth")
        s.say(growth_report(s.plan, s.k, before, s.rec.eval_loss))
        if not math.isfinite(s.rec.eval_loss):  # the same value on every rank (all-reduced): all stop alike
            was = "" if before is None else f", {before:.4f} before it"
            raise NonFinite(
                f"stage {stage.name}: eval loss {s.rec.eval_loss} right after growth {s.plan.stages[s.k - 1].name} -> "
                f"{stage.name} ({stage.grow or 'identity'}{was}); stopped before training ({_kept_msg(s.paths.ckpt)})"
            )

    def logged(self, lr: float) -> None:
        """The log line of the current step (rank 0)."""
        s, rec, stage, L = self.s, self.s.rec, self.s.stage, self.s.stage.layout
        if s.rank != 0:
            return
        now = time.perf_counter()
        dt = (now - self.t_last - (self.meter.eval_seconds - self.eval_s)) / self.steps_since  # training time only
        entry = {
            "stage": stage.name,
            "step": rec.step,
            "loss": rec.loss,
            "lr": lr,
            "sample_index": rec.sample_index,
            "tokens_per_s": L.global_batch * stage.model.seq_len / dt,
            "step_time_s": dt,
            "grad_norm": _grad_norm(s.engine),
            **self.meter.train_fields(rec.step, dt),
            "time": time.time(),
        }
        self.write(entry)
        mfu = "" if entry["mfu"] is None else f" MFU {100 * entry['mfu']:.1f}%"
        s.say(
            f"[megagrow] {stage.name} step {rec.step}/{stage.steps} loss {rec.loss:.4f} lr {lr:.2e} "
            f"{entry['tokens_per_s']:.0f} tok/s {entry['tflops_per_device']:.3g} TFLOP/s/dev{mfu}"
        )
        self.t_last, self.steps_since, self.eval_s = now, 0, self.meter.eval_seconds

    def evals_due(self, stopper: Stopper) -> None:
        """The stage-end eval (before the save, so the checkpoint carries it: the next stage's "before
        growth"), or a periodic one, on which the slope rule may end the stage."""
        rec = self.s.rec
        if rec.finished and self.meter.enabled:
            self.evaluate("stage_end")
        elif self.meter.periodic_due(rec.step, rec.finished):
            v = self.evaluate("periodic")
            if stopper.on_eval(v):
                self.evaluate("stage_end", v)  # the same model: its stage-end record, not a second eval

    def close(self) -> None:
        self.log.close()
        self.meter.close()


class Stopper:
    """The stage's stop rule ({rule: slope}; None: the stage ends at `steps`), on the logged training loss,
    or on the periodic eval loss when there is one."""

    def __init__(self, s: Started, meter: Meter):
        from megagrow.schedule.stop import StageStop

        self.s = s
        self.rule = StageStop.of(
            s.plan, s.k, s.rec.lr_offset, s.paths.log, s.rec.step, use_eval=meter.meter.enabled and s.stage.eval_every > 0
        )

    def on_logged(self) -> None:
        s = self.s
        if self.rule and self.rule.update(s.rec.step, s.rec.loss):
            s.ends_here()
            s.say(
                f"[megagrow] {s.stage.name}: slope rule (d log L / d log C {self.rule.rule.slope:.4f} > "
                f"{self.rule.threshold}) ends the stage at step {s.rec.step}"
            )

    def on_eval(self, v: float) -> bool:
        s = self.s
        if not (self.rule and self.rule.update_eval(s.rec.step, v)):
            return False
        s.ends_here()
        s.say(
            f"[megagrow] {s.stage.name}: slope rule on the eval loss (d log L / d log C {self.rule.rule.slope:.4f} > "
            f"{self.rule.threshold}) ends the stage at step {s.rec.step}"
        )
        return True


def step(s: Started, lr: float, nonfinite: list) -> float:
    """One training step and its one collective and host sync: the loss summed over all ranks (TP ranks
    hold the same value), the stop flag (any rank signalled -> all save together) and whether the gradient
    norm was finite. Advances the record; a non-finite step is skipped up to skip_nonfinite_steps
    (`nonfinite`: a one-element count). Returns the stop votes."""
    stage, L, rel, device = s.stage, s.stage.layout, s.plan.reliability, s.engine.device
    total = train_step(s.engine, s.optimizer, s.batches, s.plan.seed, L.grad_accum, s.rec.sample_index, lr, device)
    red = torch.stack([total, torch.tensor(1.0 if s.stop.raised else 0.0, device=device), _grad_norm_bad(s.engine, device)])
    collectives.all_reduce(red)
    loss_sum, stop_votes, grad_bad = red.tolist()
    s.rec = s.rec.replace(step=s.rec.step + 1, loss=loss_sum / (L.grad_accum * torch.distributed.get_world_size()))
    s.beat.beat()
    faults.point("step", s.rec.step)
    if not math.isfinite(loss_sum) or grad_bad > 0:
        nonfinite[0] += 1
        n, allowed = nonfinite[0], rel.skip_nonfinite_steps
        what = f"loss {s.rec.loss}" if not math.isfinite(loss_sum) else "gradient norm not finite"
        if n > allowed or not fp32_finite(s.optimizer):
            raise NonFinite(
                f"stage {stage.name}: {what} at step {s.rec.step} (lr {lr:.3g})"
                + (f", {n} such steps (skip_nonfinite_steps {allowed})" if n > 1 else "")
                + f"; stopped without saving ({_kept_msg(s.paths.ckpt)}); lower optim.lr or check the data"
            )
        if s.rank == 0:
            print(
                f"[megagrow] {stage.name}: {what} at step {s.rec.step}: update skipped, weights finite ({n} of {allowed} allowed)",
                flush=True,
            )
    return stop_votes


def run_stage(s: Started, stop_at: int | None = None) -> int:
    """The loop: a step, then the stopper, the meter and the checkpointer each act when their own cadence
    says so. Returns EXIT_OK at the stage's end (or `stop_at`), EXIT_PREEMPTED after a signal's save."""
    from megagrow.schedule.lr import LRSchedule

    stage = s.stage
    sched = LRSchedule.from_optim(stage.optim, stage.steps, s.rec.lr_offset, s.rec.rewarmup)
    s.end = s.rec.end_step if stop_at is None else min(stop_at, s.rec.end_step)
    checkpointer = Checkpointer(s)
    faults.arm(s.engine)
    meter = Meter(s)
    stopper = Stopper(s, meter)
    if s.k > 0 and s.rec.step == 0 and meter.meter.enabled:
        meter.at_growth()
    s.engine.train()
    if s.stop.agreed(s.engine.device):  # a signal that came during start-up
        return checkpointer.preempted(meter, "preempted", said=False)
    s.beat.beat(force=True)  # built, resumed or grown: start-up is over
    nonfinite = [0]
    while s.rec.step < s.end:
        lr = sched(s.rec.step)
        votes = step(s, lr, nonfinite)
        meter.steps_since += 1
        if s.rec.step % stage.log_every == 0 or s.rec.step == s.end:
            stopper.on_logged()
            meter.logged(lr)
        meter.evals_due(stopper)
        if votes > 0:
            return checkpointer.preempted(meter, "done" if s.rec.finished else "preempted")  # a signal at the last step: done
        if checkpointer.due():
            checkpointer.save("done" if s.rec.finished else "running")
    meter.close()
    s.say(f"[megagrow] stage {stage.name} at step {s.rec.step}: checkpoint {os.path.join(s.paths.ckpt, tag_of(s.rec.step))}")
    s.engine.destroy()  # frees the engine's buffers and hooks now (a process may train several stages)
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


def _grad_norm(engine) -> float | None:
    g = engine.get_global_grad_norm()
    return None if g is None else float(g)


EXACT_TOLERANCE = 1e-4  # |eval after - eval before| of a loss-preserving operator in fp32 above this: a warning


def growth_report(plan: Plan, k: int, before: float | None, after: float) -> str:
    """The line printed when stage k has grown from stage k-1, and a warning when a loss-preserving
    operator moved the eval loss (fp32) by more than EXACT_TOLERANCE, naming the grown tensor kinds."""
    from megagrow.growth.ops import logical_tensors
    from megagrow.state.decision import decide

    prev, stage = plan.stages[k - 1], plan.stages[k]
    if before is None:
        return f"[megagrow] eval loss after growth {prev.name} -> {stage.name}: {after:.4f} (no comparable eval before it)"
    delta = after - before
    line = f"[megagrow] eval loss at growth {prev.name} -> {stage.name}: {before:.4f} -> {after:.4f} (delta {delta:.1e})"
    try:
        exact = decide(plan, k, prev.model).op.exact
    except Exception:  # noqa: BLE001 - a report line must not fail the stage
        exact = False
    if exact and abs(delta) > EXACT_TOLERANCE and stage.layout.dtype == "fp32":
        old, new = logical_tensors(prev.model), logical_tensors(stage.model)
        kinds = sorted({n.split(".", 2)[2] if n.startswith("blocks.") else n for n, s in new.items() if old.get(n) != s})
        line += (
            f"\n[megagrow] WARNING: {stage.grow or 'identity'} is loss preserving but the eval loss moved by "
            f"{delta:+.2e} (> {EXACT_TOLERANCE:.0e}); grown tensor kinds: {', '.join(kinds)}"
        )
    return line
