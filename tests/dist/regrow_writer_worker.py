"""The offline writer against the engine path, in one launch (torchrun, 2 ranks, gloo, CPU).

    torchrun --nproc_per_node=2 tests/dist/regrow_writer_worker.py DATA_PREFIX OUT_DIR

For each case the same source is regrown twice into the same target: by `executor.regrow` (a
DeepSpeed engine fills and saves) and by `executor.regrow_offline` (megagrow/state/writer.py
writes the files). Rank 0 compares every file of the two outputs object by object (keys in order,
types, tensor dtype/shape/requires_grad and values bitwise); then each output is loaded by a real
engine (`engine.load_checkpoint`) and every rank compares what the load left -- module weights,
fp32 master, exp_avg, exp_avg_sq, Adam step, DeepSpeed's counters, the client state (megagrow's
record) -- and the losses of a training step and of the forward after it. Rank 0 writes
OUT_DIR/result.json; tests/dist/test_regrow_writer.py makes the assertions.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from worker import RANK, WORLD, tiny_plan  # noqa: E402

from megagrow.parallel.groups import init_distributed  # noqa: E402

Z3 = "ds_configs/cpu.json"


def file_diff(a, b, path: str = "", out: list | None = None) -> list:
    """Where two loaded checkpoint objects differ (empty: the same keys in the same order, types,
    tensor dtypes, shapes, requires_grad and values bitwise)."""
    out = [] if out is None else out
    if type(a) is not type(b):
        out.append(f"{path}: type {type(a).__name__} != {type(b).__name__}")
    elif isinstance(a, dict):
        if list(a) != list(b):
            out.append(f"{path}: keys {list(a)} != {list(b)}")
        for k in a:
            if k in b:
                file_diff(a[k], b[k], f"{path}/{k}", out)
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            file_diff(x, y, f"{path}[{i}]", out)
    elif torch.is_tensor(a):
        if (a.dtype, a.shape, a.requires_grad) != (b.dtype, b.shape, b.requires_grad) or not torch.equal(a, b):
            out.append(f"{path}: tensor {a.dtype}{tuple(a.shape)} differs from {b.dtype}{tuple(b.shape)}")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        if vars(a) != vars(b):
            out.append(f"{path}: {vars(a)} != {vars(b)}")
    elif a != b:
        out.append(f"{path}: {a!r} != {b!r}")
    return out


def compare_dirs(a: str, b: str) -> list:
    """file_diff over every file of two checkpoint directories (and the set of files)."""
    fa = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    fb = sorted(os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) for f in fs)
    out = [] if fa == fb else [f"files {fa} != {fb}"]
    for f in fa:
        if f not in fb:
            continue
        if f.endswith(".pt"):
            out += file_diff(torch.load(os.path.join(a, f), weights_only=False), torch.load(os.path.join(b, f), weights_only=False), f)
        elif open(os.path.join(a, f), "rb").read() != open(os.path.join(b, f), "rb").read():
            out.append(f"{f}: bytes differ")
    return out


def loaded_state(plan, k: int, ckpt: str) -> tuple[dict, dict, list]:
    """What engine.load_checkpoint leaves on this rank (tensors by name), the client state, and the
    losses of one training step on a fixed batch and of the forward after it."""
    from megagrow.parallel.engine import build_stage
    from megagrow.state.executor import fp32_partitions

    engine, optimizer = build_stage(plan, k)
    _, client = engine.load_checkpoint(ckpt)
    out = {}
    for n, p in engine.module.named_parameters():
        out[f"module/{n}"] = (p.ds_tensor if hasattr(p, "ds_tensor") else p).detach().clone()
    for i, f in enumerate(fp32_partitions(optimizer)):
        out[f"fp32/{i}"] = f.detach().clone()
        for key, v in optimizer.optimizer.state.get(f, {}).items():
            out[f"{key}/{i}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(float(v))
    out["counters"] = torch.tensor([engine.global_steps, engine.global_samples, engine.skipped_steps], dtype=torch.float64)
    L, m = plan.stages[k].layout, plan.stages[k].model
    g = torch.Generator().manual_seed(100 + RANK // L.tp)  # the same batch on the ranks of a TP group
    x = torch.randint(0, m.vocab_size, (L.micro_batch, m.seq_len), generator=g)
    y = torch.randint(0, m.vocab_size, (L.micro_batch, m.seq_len), generator=g)
    losses = []
    engine.train()
    for _ in range(L.grad_accum):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(engine(x, y).item())
    engine.destroy()
    return out, client, losses


def state_diff(a: dict, b: dict) -> list:
    return sorted(set(a) ^ set(b)) + sorted(n for n in a if n in b and (a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])))


def cases(prefix: str) -> list:
    """(name, plan, target stage, source layout of stage 0)."""
    gpt = tiny_plan(prefix, steps=2, tp=1, dp=2, zero_stage=2)
    llama = tiny_plan(prefix, flavour="llama", tie=False, steps=2, tp=2, dp=1, zero_stage=1)

    def at(base, **lay):
        s = base.stages[0]
        return base.replace(stages=(s.replace(layout=s.layout.replace(**lay)),))

    s0 = gpt.stages[0]
    depth = gpt.replace(stages=(s0, s0.replace(name="s1", model=s0.model.replace(n_layers=4), grow="depth",
                                                layout=s0.layout.replace(zero_stage=1))))
    return [
        ("zero1", at(gpt, zero_stage=1), 0, gpt),
        ("zero2-bf16", at(gpt, zero_stage=2, dtype="bf16"), 0, gpt),
        ("zero1-bf16", at(gpt, zero_stage=1, dtype="bf16"), 0, gpt),
        ("zero3", at(gpt, zero_stage=3, ds_config=Z3), 0, gpt),
        ("tp2", at(gpt, tp=2, dp=1, zero_stage=1), 0, gpt),
        ("depth-x2-zero1", depth, 1, gpt),
        ("llama-untied-zero3-bf16", at(llama, tp=1, dp=2, zero_stage=3, dtype="bf16", ds_config=Z3), 0, llama),
        ("llama-untied-zero2", at(llama, tp=1, dp=2, zero_stage=2), 0, llama),
    ]


def main(prefix: str, out: str) -> dict:
    from megagrow.state.checkpoint import SourceCheckpoint
    from megagrow.state.executor import regrow, regrow_offline
    from megagrow.train import train_stage

    res, sources = {}, {}
    for name, plan, k, src_plan in cases(prefix):
        key = id(src_plan)
        if key not in sources:  # each source trained once
            run = os.path.join(out, f"src{len(sources)}")
            init_distributed(src_plan.stages[0].layout)
            train_stage(src_plan, 0, run, quiet=True)
            torch.distributed.barrier()
            sources[key] = os.path.join(run, "s0", "checkpoints")
        init_distributed(plan.stages[k].layout)
        a, b = os.path.join(out, f"{name}-engine"), os.path.join(out, f"{name}-writer")
        regrow(plan, k, SourceCheckpoint.open(sources[key]), a)
        torch.distributed.barrier()
        info = regrow_offline(plan, k, SourceCheckpoint.open(sources[key]), b)
        torch.distributed.barrier()
        r = {"file_diff": compare_dirs(a, b)[:20] if RANK == 0 else None, "adam_step": info["adam_step"]}
        sa, ca, la = loaded_state(plan, k, a)
        sb, cb, lb = loaded_state(plan, k, b)
        per_rank = [None] * WORLD
        torch.distributed.all_gather_object(per_rank, {"state_diff": state_diff(sa, sb), "tensors": len(sa),
                                                       "client_equal": ca == cb, "record_step": ca.get("step"),
                                                       "losses": [la, lb]})
        r["ranks"] = per_rank
        res[name] = r
        torch.distributed.barrier()
        if RANK == 0:
            shutil.rmtree(a, ignore_errors=True)
            shutil.rmtree(b, ignore_errors=True)
    return res


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2])
    if RANK == 0:
        with open(os.path.join(sys.argv[2], "result.json"), "w") as f:
            json.dump(result, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
