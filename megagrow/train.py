"""One stage of a plan: build (or resume) the engine, train to the stage's end, save.

Run under torchrun or srun, one process per rank:

    torchrun --nproc_per_node=2 -m megagrow.cli train recipes/tiny.yaml --stage 0

Progress lives in the run directory:
    RUN/<stage>/checkpoints/   native DeepSpeed checkpoints (tags step_00000050, ...; `latest`)
    RUN/<stage>/log.jsonl      one JSON object per logged step (rank 0)
    RUN/<stage>/status.json    {"state": "running" | "preempted" | "done", "step", ...}, written atomically

The data position is a global sample index (`sample_index`), stored in every checkpoint, so
a run resumes at the same sample whatever its DP size. SIGUSR1/SIGTERM only set a flag; at
the next step boundary all ranks agree (all-reduce), save together and exit with
EXIT_PREEMPTED.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import zlib
from dataclasses import dataclass, field

import torch

from megagrow import __version__
from megagrow.config import Plan, Stage
from megagrow.errors import EXIT_OK, EXIT_PREEMPTED, UserError
from megagrow.fsutil import write_json_atomic

DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class StagePaths:
    root: str

    @property
    def ckpt(self) -> str:
        return os.path.join(self.root, "checkpoints")

    @property
    def log(self) -> str:
        return os.path.join(self.root, "log.jsonl")

    @property
    def status(self) -> str:
        return os.path.join(self.root, "status.json")

    @classmethod
    def of(cls, run_dir: str, stage: Stage) -> "StagePaths":
        return cls(os.path.join(run_dir, stage.name))


class StopFlag:
    """Signal handlers only set this flag; ranks agree on it at step boundaries."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        from megagrow.signals import early_signal

        self.raised: int | None = early_signal()  # one caught while torch was still importing
        for s in signals:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.raised = signum

    def agreed(self, device) -> bool:
        t = torch.tensor([1.0 if self.raised else 0.0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)


# --------------------------------------------------------------------------------------
# data


@dataclass
class Batches:
    """Micro-batches of the global sample stream for this DP rank."""

    dataset: object
    sampler: object
    seq_len: int
    stage: Stage
    dp_rank: int
    dp_size: int

    @classmethod
    def open(cls, plan: Plan, stage: Stage, dp_rank: int, dp_size: int) -> "Batches":
        from megagrow.data import GlobalSampler, TokenDataset

        ds = TokenDataset(plan.data.prefix)
        m = stage.model
        if ds.vocab_size > m.vocab_size:
            raise UserError(f"dataset {plan.data.prefix} has vocab {ds.vocab_size} > model vocab_size {m.vocab_size}")
        n = ds.num_windows(m.seq_len)
        if n < 1:
            raise UserError(f"dataset {plan.data.prefix} is shorter than one sequence of {m.seq_len + 1} tokens")
        return cls(ds, GlobalSampler(n, plan.seed), m.seq_len, stage, dp_rank, dp_size)

    def micro(self, first_sample: int, micro_step: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(tokens, targets, global index of its first sample) for one micro-step of one step
        whose global batch starts at global sample index `first_sample`."""
        from megagrow.data import rank_slice

        L = self.stage.layout
        lo, hi = rank_slice(L.global_batch, self.dp_size, self.dp_rank, L.micro_batch, L.grad_accum, micro_step)
        rows = self.dataset.windows(self.sampler.indices(first_sample + lo, first_sample + hi), self.seq_len)
        x = torch.from_numpy(rows).to(device)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous(), first_sample + lo


def dropout_seed(seed: int, global_index: int) -> int:
    """Dropout masks are a function of (plan seed, data position): identical on resume."""
    return zlib.crc32(f"{seed}:{global_index}".encode())


# --------------------------------------------------------------------------------------
# the stage


@dataclass
class StageState:
    """What a checkpoint records besides DeepSpeed's own state."""

    step: int = 0
    sample_offset: int = 0  # global sample index of this stage's step 0 (carried over growth)
    lr_offset: int = 0  # schedule position of step 0 (the grown model's equivalent step)
    rewarmup: int = 0
    history: list = field(default_factory=list)
    final: int | None = None  # the step a stop rule ended the stage at (None: it ends at `steps`)

    def sample_index(self, stage: Stage) -> int:
        return self.sample_offset + self.step * stage.layout.global_batch


def client_state(plan: Plan, k: int, st: StageState, loss: float | None) -> dict:
    stage = plan.stages[k]
    return {
        "megagrow_version": __version__,
        "plan": plan.to_dict(),
        "stage_index": k,
        "stage": stage.to_dict(),
        "step": st.step,
        "sample_offset": st.sample_offset,
        "sample_index": st.sample_index(stage),
        "lr_offset": st.lr_offset,
        "rewarmup": st.rewarmup,
        "loss": loss,
        "final_step": st.final,
    }


def check_resume(cs: dict, plan: Plan, k: int) -> None:
    """A checkpoint resumes this stage only with the same model and the same layout."""
    stage = plan.stages[k]
    saved = cs.get("stage", {})
    if saved.get("model") != stage.model.to_dict():
        raise UserError(f"checkpoint of stage {stage.name!r} was written for another model config; refusing to resume")
    if saved.get("layout") != stage.layout.to_dict():
        raise UserError(
            f"checkpoint of stage {stage.name!r} was written at layout {saved.get('layout')}, this run uses "
            f"{stage.layout.to_dict()}: reshard it with tools/regrow.py"
        )


def build(plan: Plan, k: int, init: bool = True):
    """Model and DeepSpeed engine for stage k (process groups already initialised).
    init=False skips drawing initial weights (the caller overwrites every one of them)."""
    from megagrow.model.gpt import GPT, build_model
    from megagrow.parallel.engine import build_engine

    stage = plan.stages[k]
    dtype = DTYPE[stage.layout.dtype]
    model = build_model(stage.model, plan.seed, dtype) if init else GPT(stage.model, dtype)
    engine, optimizer = build_engine(model, stage)
    return engine, optimizer


def train_stage(plan: Plan, k: int, run_dir: str, stop_at: int | None = None, quiet: bool = False) -> int:
    """Train stage k of `plan` to its end (or to step `stop_at`, saving there). Returns an exit code."""
    from megagrow.parallel.engine import set_lr
    from megagrow.parallel.groups import dp_rank_size, init_distributed
    from megagrow.schedule.lr import LRSchedule
    from megagrow.schedule.stop import StageStop

    stage = plan.stages[k]
    paths = StagePaths.of(run_dir, stage)
    stop = StopFlag()
    init_distributed(stage.layout)
    rank = torch.distributed.get_rank()
    dp_rank, dp_size = dp_rank_size()
    batches = Batches.open(plan, stage, dp_rank, dp_size)  # bad data fails before the engine is built
    if k > 0 and not os.path.isfile(os.path.join(paths.ckpt, "latest")):
        transition(plan, k, run_dir, quiet)
    engine, optimizer = build(plan, k)
    device = engine.device

    st = StageState()
    if os.path.isfile(os.path.join(paths.ckpt, "latest")):
        _, cs = engine.load_checkpoint(paths.ckpt)
        check_resume(cs, plan, k)
        st = StageState(step=cs["step"], sample_offset=cs["sample_offset"], lr_offset=cs["lr_offset"], rewarmup=cs["rewarmup"],
                        final=cs.get("final_step"))
        if rank == 0 and not quiet:
            print(f"[megagrow] resumed stage {stage.name} at step {st.step} (sample {st.sample_index(stage)})", flush=True)
    if rank == 0:
        os.makedirs(paths.root, exist_ok=True)
    sched = LRSchedule.from_optim(stage.optim, stage.steps, st.lr_offset, st.rewarmup)
    L = stage.layout
    end = stage.steps if stop_at is None else min(stop_at, stage.steps)
    final = stage.steps if st.final is None else st.final  # a stop rule may end the stage earlier
    end = min(end, final)
    stopper = StageStop.of(plan, k, st.lr_offset, paths.log, st.step)  # stop: {rule: slope}; None: at `steps`
    loss_v = None

    def save(state: str) -> None:
        engine.save_checkpoint(paths.ckpt, tag=tag_of(st.step), client_state=client_state(plan, k, st, loss_v))
        if rank == 0:
            write_json_atomic(paths.status, {"state": state, "stage": stage.name, "step": st.step, "steps": stage.steps,
                                             "sample_index": st.sample_index(stage), "loss": loss_v, "tag": tag_of(st.step),
                                             "layout": L.to_dict(), "time": time.time(),
                                             **({"stopped_by": stage.stop.rule} if final < stage.steps else {})})

    if rank == 0:
        trim_log(paths.log, st.step)
    log = open(paths.log, "a") if rank == 0 else None
    t_last, steps_since = time.perf_counter(), 0
    engine.train()
    if stop.agreed(device):  # a signal that came during start-up
        save("preempted")
        return EXIT_PREEMPTED
    world = torch.distributed.get_world_size()
    while st.step < end:
        lr = sched(st.step)
        set_lr(optimizer, lr)
        first = st.sample_index(stage)
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
        loss_v = loss_sum / (L.grad_accum * world)
        st.step += 1
        steps_since += 1
        if stopper and (st.step % stage.log_every == 0 or st.step == end) and stopper.update(st.step, loss_v):
            final = end = st.final = st.step  # the slope rule fired on the logged loss: the stage ends here
            if rank == 0 and not quiet:
                print(f"[megagrow] {stage.name}: slope rule (d log L / d log C {stopper.rule.slope:.4f} > "
                      f"{stopper.threshold}) ends the stage at step {st.step}", flush=True)
        if rank == 0 and (st.step % stage.log_every == 0 or st.step == end):
            now = time.perf_counter()
            dt = (now - t_last) / steps_since
            rec = {"stage": stage.name, "step": st.step, "loss": loss_v, "lr": lr, "sample_index": st.sample_index(stage),
                   "tokens_per_s": L.global_batch * stage.model.seq_len / dt, "step_time_s": dt,
                   "grad_norm": _grad_norm(engine), "time": time.time()}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if not quiet:
                print(f"[megagrow] {stage.name} step {st.step}/{stage.steps} loss {loss_v:.4f} lr {lr:.2e} "
                      f"{rec['tokens_per_s']:.0f} tok/s", flush=True)
            t_last, steps_since = now, 0
        if stop_votes > 0:
            save("preempted")
            if rank == 0 and not quiet:
                print(f"[megagrow] signal received: saved stage {stage.name} at step {st.step}, exiting {EXIT_PREEMPTED}", flush=True)
            return EXIT_PREEMPTED
        if st.step % stage.save_every == 0 or st.step == end:
            save("done" if st.step == final else "running")
    if rank == 0 and not quiet:
        print(f"[megagrow] stage {stage.name} at step {st.step}: checkpoint {os.path.join(paths.ckpt, tag_of(st.step))}", flush=True)
    return EXIT_OK


def transition(plan: Plan, k: int, run_dir: str, quiet: bool = False) -> None:
    """Stage k-1's final checkpoint -> stage k's first, grown and resharded shard to shard."""
    from megagrow.state.checkpoint import SourceCheckpoint
    from megagrow.state.executor import regrow

    prev, stage = plan.stages[k - 1], plan.stages[k]
    prev_paths, paths = StagePaths.of(run_dir, prev), StagePaths.of(run_dir, stage)
    if not os.path.isfile(os.path.join(prev_paths.ckpt, "latest")):
        raise UserError(f"stage {stage.name!r} starts from stage {prev.name!r}, which has no checkpoint in {prev_paths.ckpt}")
    src = SourceCheckpoint.open(prev_paths.ckpt)
    if src.client["step"] != (src.client.get("final_step") or prev.steps):
        raise UserError(f"stage {prev.name!r} is at step {src.client['step']} of {prev.steps}: finish it first")
    t0 = time.perf_counter()
    rank = torch.distributed.get_rank()
    if rank == 0 and not quiet:
        print(f"[megagrow] transition {prev.name} -> {stage.name} ({stage.grow or 'identity'}): start", flush=True)
    # written under a temporary name and renamed once every rank is done: an interrupted
    # transition never leaves a half-written `checkpoints/` (the controller discards the rest)
    tmp = paths.ckpt + ".partial"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    torch.distributed.barrier()
    info = regrow(plan, k, src, tmp)  # ends with a barrier: every rank's files are written
    if rank == 0:
        shutil.rmtree(paths.ckpt, ignore_errors=True)  # no `latest` there (else no transition): leftovers only
        os.replace(tmp, paths.ckpt)
    torch.distributed.barrier()
    if rank == 0 and not quiet:
        print(f"[megagrow] transition {prev.name} -> {stage.name} ({info['op']}) at {stage.layout.to_dict()} "
              f"in {time.perf_counter() - t0:.1f} s, read {info['bytes_read'] / 1e6:.2f} MB on rank 0", flush=True)


def trim_log(path: str, step: int) -> None:
    """Drop log records past `step` (the checkpoint resumed from): steps logged after the last
    save of a run killed without a signal are trained again, and must not appear twice."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):  # a torn last line
            pass
    if len(keep) != len(lines):
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def _grad_norm(engine) -> float | None:
    g = engine.get_global_grad_norm()
    return None if g is None else float(g)
