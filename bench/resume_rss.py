#!/usr/bin/env python
"""Peak host memory (RSS) of a rank while it resumes: DeepSpeed's engine.load_checkpoint against
megagrow's shard-reader resume (megagrow.state.resume.load_own), at ZeRO-1/2/3, DP ranks on this
machine (gloo, CPU).

For each ZeRO stage: one launch builds a GPT-2 of the given size at DP=`--dp` and saves a sealed
checkpoint (fresh weights, Adam state allocated; no data needed); then, in fresh processes, one
launch per path builds the engine and loads the checkpoint, the kernel's RSS high-water mark reset
(/proc/self/clear_refs, after glibc's malloc_trim) before the build and again before the load. Per
rank it reports `growth`, the RSS growth during the load (peak VmHWM minus RSS before it: what the
load adds to a built engine); `transient`, that peak minus the RSS after the load (memory the load
needed and gave back); `resume_peak`, the peak of build + load over the RSS before the build; its
own optimizer file's bytes (its shard: fp32 master + 2 Adam moments), the TP-local module file's
bytes, and the largest parameter's fp32 bytes. The new path builds without drawing weights; its
engine's weight and fp32-master pages are touched (zeroed) before the load's measurement, as the old
path's weight draw touches them, so `growth` compares the loads alone.

    python bench/resume_rss.py [--d-model 768] [--layers 12] [--vocab 32000] [--zero 1 3] [--paths old new] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megagrow.errors import UserError, cli_entry  # noqa: E402
from megagrow.memory import reset_peak as _reset_peak  # noqa: E402
from megagrow.memory import status as _status  # noqa: E402


def _plan(a):
    from megagrow.config import DataConfig, Layout, ModelConfig, OptimConfig, Plan, Stage

    model = ModelConfig(
        flavour="gpt2", n_layers=a.layers, d_model=a.d_model, n_heads=a.d_model // 64, vocab_size=a.vocab, seq_len=64, tie_embeddings=True
    )
    lay = Layout(
        tp=1,
        dp=a.dp,
        zero_stage=a.zero,
        micro_batch=1,
        grad_accum=1,
        dtype=a.dtype,
        ds_config="ds_configs/cpu.json" if a.zero == 3 else None,
    )
    st = Stage(name="s0", model=model, layout=lay, optim=OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=0), steps=10)
    return Plan(name="resume_rss", seed=1, data=DataConfig(prefix="(unused)"), stages=(st,))


def _rank(a) -> None:
    """One rank of a launch: save (role "save"), or build + load one way ("old" / "new") and report."""
    import torch

    from megagrow import collectives
    from megagrow.parallel.engine import build_stage
    from megagrow.parallel.groups import init_distributed
    from megagrow.state import manifest
    from megagrow.state.executor import init_optimizer_state
    from megagrow.state.record import StageRecord

    plan = _plan(a)
    init_distributed(plan.stages[0].layout)
    rank = torch.distributed.get_rank()
    ckpt, tag = os.path.join(a.workdir, f"z{a.zero}", "checkpoints"), "step_00000000"
    if a.role in ("save", "save+new"):
        engine, optimizer = build_stage(plan, 0)
        init_optimizer_state(engine, optimizer)
        manifest.save_record(engine, ckpt, StageRecord(plan, 0))
        if a.role == "save":
            return
        engine.destroy()  # the new path measured in this process: its memory freed, and trimmed below
        del engine, optimizer
        a.role = "new"
    _reset_peak()
    b0 = _status()
    if a.role == "old":
        engine, optimizer = build_stage(plan, 0)
        load = lambda: engine.load_checkpoint(ckpt, tag=tag)  # noqa: E731
    else:
        from megagrow.state.checkpoint import SourceCheckpoint
        from megagrow.state.executor import fp32_partitions
        from megagrow.state.resume import load_own
        from megagrow.train.transition import gather_persistent

        src = SourceCheckpoint.open(ckpt, tag)
        engine, optimizer = build_stage(plan, 0, init=False)
        # built without drawing weights, the engine's own weight and fp32-master pages are not yet touched;
        # touch them here (as the old path's weight draw does) so that the load's growth counts only what the
        # load itself adds; the build + load peak (resume_peak) counts them either way
        for t in [getattr(p, "ds_tensor", p) for p in engine.module.parameters()] + fp32_partitions(optimizer):
            t.data.zero_()

        def load():
            load_own(engine, optimizer, src)
            src.close()
            gather_persistent(engine)

    built = _status()
    collectives.barrier()
    _reset_peak()
    before = _status()
    load()
    after = _status()
    collectives.barrier()
    own = os.path.join(ckpt, tag, f"{'bf16_' if a.dtype == 'bf16' else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    module = os.path.join(ckpt, tag, "mp_rank_00_model_states.pt")
    res = {
        "rank": rank,
        "growth": after["VmHWM"] - before["VmRSS"],
        "transient": after["VmHWM"] - after["VmRSS"],
        "resume_peak": max(built["VmHWM"], after["VmHWM"]) - b0["VmRSS"],
        "rss_before_load": before["VmRSS"],
        "own_shard_bytes": os.path.getsize(own),
        "module_file_bytes": os.path.getsize(module) if a.zero != 3 else 0,
        "largest_tensor_bytes": 4 * max(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters()),
        "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters()),
    }
    with open(os.path.join(a.workdir, f"z{a.zero}-{a.role}-rank{rank}.json"), "w") as f:
        json.dump(res, f)


def _launch(a, zero: int, role: str) -> None:
    from megagrow.parallel.groups import free_port

    args = [
        sys.executable,
        os.path.abspath(__file__),
        "--_role",
        role,
        "--_zero",
        str(zero),
        "--workdir",
        a.workdir,
        "--d-model",
        str(a.d_model),
        "--layers",
        str(a.layers),
        "--vocab",
        str(a.vocab),
        "--dp",
        str(a.dp),
        "--dtype",
        a.dtype,
    ]
    port = str(free_port())
    procs = []
    for r in range(a.dp):
        env = dict(
            os.environ,
            RANK=str(r),
            WORLD_SIZE=str(a.dp),
            LOCAL_RANK=str(r),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        for k, v in (("DS_ACCELERATOR", "cpu"), ("OMP_NUM_THREADS", "1"), ("PYTHONWARNINGS", "ignore"), ("DS_BUILD_OPS", "0")):
            env.setdefault(k, v)
        procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate()[1] for p in procs]
    if any(p.returncode != 0 for p in procs):
        raise UserError(f"ZeRO-{zero} {role} launch failed: {(errs[0] or errs[-1]).strip().splitlines()[-1:]}")


def run(a) -> dict:
    out = {"model": {"d_model": a.d_model, "layers": a.layers, "vocab": a.vocab, "dtype": a.dtype}, "dp": a.dp, "zero": {}}
    for zero in a.zero:
        same = a.same_launch and a.paths == ["new"]
        _launch(a, zero, "save+new" if same else "save")
        res = {"new": [json.load(open(os.path.join(a.workdir, f"z{zero}-new-rank{r}.json"))) for r in range(a.dp)]} if same else {}
        for role in [] if same else a.paths:
            _launch(a, zero, role)
            res[role] = [json.load(open(os.path.join(a.workdir, f"z{zero}-{role}-rank{r}.json"))) for r in range(a.dp)]
        out["zero"][str(zero)] = res
    return out


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--zero", type=int, nargs="+", default=[1, 3], choices=(1, 2, 3))
    p.add_argument("--paths", nargs="+", default=["old", "new"], choices=("old", "new"))
    p.add_argument(
        "--same-launch",
        action="store_true",
        help="with --paths new: save and measure in one launch per ZeRO stage (the save's memory freed and "
        "trimmed first; faster, for tests)",
    )
    p.add_argument("--workdir", help="where the checkpoints go (default: a temporary directory, removed after)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (default: a table)")
    p.add_argument("--_role", choices=("save", "save+new", "old", "new"), help=argparse.SUPPRESS)
    p.add_argument("--_zero", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.d_model <= 0 or a.d_model % 64 or a.layers <= 0 or a.vocab <= 0 or a.dp <= 0:
        p.error("--d-model must be a positive multiple of 64; --layers, --vocab and --dp positive")
    if a.same_launch and a.paths != ["new"]:
        p.error("--same-launch measures the new path only: give --paths new")
    return a


@cli_entry
def main(argv=None) -> int:
    a = _args(argv)
    if a._role:
        a.role, a.zero = a._role, a._zero
        _rank(a)
        return 0
    if not os.path.exists("/proc/self/clear_refs"):
        raise UserError("needs Linux's /proc/self/clear_refs (the RSS high-water mark reset)")
    with tempfile.TemporaryDirectory(prefix="resume_rss_") as tmp:
        a.workdir = a.workdir or tmp
        res = run(a)
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    mb = 1 << 20
    print(f"GPT-2 d={a.d_model} L={a.layers} V={a.vocab} {a.dtype}, DP={a.dp}: RSS growth during the load per rank (MiB)")
    for zero, paths in res["zero"].items():
        for role, ranks in paths.items():
            r = ranks[0]
            growth = ", ".join(f"{x['growth'] / mb:.0f}" for x in ranks)
            print(
                f"  ZeRO-{zero} {role:3s}: growth {growth}; own shard "
                f"{r['own_shard_bytes'] / mb:.0f}, module file {r['module_file_bytes'] / mb:.0f}, largest tensor "
                f"{r['largest_tensor_bytes'] / mb:.0f}, params {r['params'] / 1e6:.1f}M"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
