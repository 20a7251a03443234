"""Resume through the shard reader vs DeepSpeed's engine.load_checkpoint, in one launch (gloo, CPU):

    torchrun --nproc_per_node=2 tests/dist/resume_shard_worker.py DATA_PREFIX OUT_DIR

For each layout: train 3 steps and save (the trainer, stop_at=3), then load the checkpoint both ways into
fresh engines and compare every piece of state bitwise, then one more step on each (dropout on) and
compare the loss and the updated fp32 master. Rank 0 writes OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from worker import RANK, WORLD, tiny_plan  # noqa: E402

CASES = [  # (tp, zero_stage, dtype)
    (1, 1, "bf16"),
    (1, 2, "fp32"),
    (1, 3, "fp32"),
    (1, 3, "bf16"),
    (2, 1, "fp32"),
    (2, 2, "bf16"),
    (2, 3, "fp32"),
]


def snapshot(engine, optimizer, rec) -> dict:
    """Every piece of resumed state, as CPU tensors or plain values."""
    from megagrow.state.executor import fp32_partitions

    out = {}
    for i, p in enumerate(fp32_partitions(optimizer)):
        out[f"fp32[{i}]"] = p.detach().clone()
        st = optimizer.optimizer.state[p]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            out[f"{key}[{i}]"] = torch.as_tensor(st[key]).detach().clone()
    for name, p in engine.module.named_parameters():
        out[f"module.{name}"] = (p.ds_tensor if hasattr(p, "ds_tensor") else p).detach().clone()
        if hasattr(p, "ds_tensor") and p.numel() > 0:  # a ZeRO-3 parameter held whole (persistent)
            out[f"module_whole.{name}"] = p.detach().clone()
    out["engine_counters"] = [engine.global_steps, engine.global_samples, engine.skipped_steps]
    out["record"] = json.dumps(rec.to_client_state(), sort_keys=True, default=str)
    return out


def one_step(plan, engine, optimizer, rec) -> tuple:
    """The next training step from the resumed state (dropout on): its loss and the updated fp32 master."""
    from megagrow.data.batches import Batches
    from megagrow.parallel.groups import dp_rank_size
    from megagrow.schedule.lr import LRSchedule
    from megagrow.state.executor import fp32_partitions
    from megagrow.train.step import train_step

    st = plan.stages[0]
    batches = Batches.open(plan, st, *dp_rank_size())
    lr = LRSchedule.from_optim(st.optim, st.steps, rec.lr_offset, rec.rewarmup)(rec.step)
    engine.train()
    loss = train_step(engine, optimizer, batches, plan.seed, st.layout.grad_accum, rec.sample_index, lr, engine.device)
    return loss.detach().clone(), [p.detach().clone() for p in fp32_partitions(optimizer)]


def old_path(plan, ckpt, tag):
    from megagrow.parallel.engine import build_stage
    from megagrow.state.record import StageRecord

    engine, optimizer = build_stage(plan, 0)
    _, cs = engine.load_checkpoint(ckpt, tag=tag)
    return engine, optimizer, StageRecord.from_client_state(cs, ckpt).resharded(plan, 0)


def new_path(plan, ckpt, tag):
    """What the trainer's resume runs (megagrow.train.start._resume), step by step, keeping the reader."""
    from megagrow.state.checkpoint import SourceCheckpoint
    from megagrow.state.resume import resume_engine, verify_resume
    from megagrow.train.transition import gather_persistent

    src = SourceCheckpoint.open(ckpt, tag)
    verified = verify_resume(src, plan.stages[0].layout.tp)
    engine, optimizer, rec, _ = resume_engine(plan, 0, src)
    gather_persistent(engine)
    files = {"opened": list(dict.fromkeys(os.path.basename(p) for p in src.opened)), "verified": verified, "bytes_read": src.bytes_read}
    return engine, optimizer, rec.resharded(plan, 0), files


def compare(a: dict, b: dict) -> list:
    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        same = (x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)) if torch.is_tensor(x) else x == y
        if not same:
            bad.append(k)
    return bad


def case(prefix: str, out: str, tp: int, zero: int, dtype: str) -> dict:
    from megagrow import collectives
    from megagrow.train import train_stage

    ds = "ds_configs/cpu.json" if zero == 3 else None
    plan = tiny_plan(prefix, steps=6, tp=tp, dp=WORLD // tp, zero_stage=zero, ds_config=ds, dropout=0.1, dtype=dtype)
    run = os.path.join(out, f"tp{tp}-z{zero}-{dtype}")
    train_stage(plan, 0, run, stop_at=3, quiet=True)
    ckpt, tag = os.path.join(run, "s0", "checkpoints"), "step_00000003"
    ea, oa, ra = old_path(plan, ckpt, tag)
    sa = snapshot(ea, oa, ra)
    la, fa = one_step(plan, ea, oa, ra)
    ea.destroy()
    eb, ob, rb, files = new_path(plan, ckpt, tag)
    sb = snapshot(eb, ob, rb)
    lb, fb = one_step(plan, eb, ob, rb)
    eb.destroy()
    mism = compare(sa, sb)
    step_equal = torch.equal(la, lb) and len(fa) == len(fb) and all(torch.equal(x, y) for x, y in zip(fa, fb))
    mine = {
        "mismatched": mism,
        "compared": len(sa),
        "next_step_equal": step_equal,
        "loss": float(la),
        "adam_step": float(sa["step[0]"]),
        **files,
    }
    return collectives.all_gather_object(mine)


def main(prefix: str, out: str) -> None:
    res = {}
    for tp, zero, dtype in CASES:
        res[f"tp{tp}-z{zero}-{dtype}"] = case(prefix, out, tp, zero, dtype)
    if RANK == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(res, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
