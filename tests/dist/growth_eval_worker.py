"""The eval at growth, for real on CPU/gloo (launched by tests/dist/test_growth_eval.py):

    torchrun --nproc_per_node=2 tests/dist/growth_eval_worker.py DATA_PREFIX OUT_DIR

One stage-0 run (TP1 x DP2, ZeRO-2) is grown (depth x2, loss preserving) into stage 1 at every
ZeRO stage x (TP1 x DP2, TP2 x DP1) with DeepSpeed's default config (no ds_config: ZeRO-3 keeps
small parameters whole on every rank), gpt2 and llama; each grown stage trains one step, and at
ZeRO-3 DP=2 the same step is taken again by a fresh engine loading the transition's checkpoint.
Last, a non-finite eval at growth (the eval forced to NaN) must stop the stage. Rank 0 writes
OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import worker  # noqa: E402 - the shared tiny plan and launch conventions (puts the repository on sys.path)

import torch  # noqa: E402

from megagrow.parallel.groups import init_distributed  # noqa: E402

RANK = worker.RANK


def _copy_stage(src_run: str, dst_run: str, stage: str) -> None:
    if RANK == 0:
        shutil.copytree(os.path.join(src_run, stage), os.path.join(dst_run, stage))
    torch.distributed.barrier()


def _records(run: str, stage: str) -> list[dict]:
    with open(os.path.join(run, stage, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def growth_eval(prefix: str, out: str) -> dict:
    from megagrow.train import train_stage

    res = {"cases": {}}
    targets = [dict(tp=tp, dp=2 // tp, zero_stage=z) for tp in (1, 2) for z in (1, 2, 3)]
    for flavour in ("gpt2", "llama"):
        base = worker.tiny_plan(prefix, flavour=flavour, steps=3, tp=1, dp=2, zero_stage=2)
        s0 = base.stages[0].replace(eval_tokens=2048)
        src = os.path.join(out, f"{flavour}-src")
        plan0 = base.replace(stages=(s0,))
        init_distributed(s0.layout)
        train_stage(plan0, 0, src, quiet=True)
        torch.distributed.barrier()
        for b in targets if flavour == "gpt2" else [t for t in targets if t["zero_stage"] == 3]:
            s1 = s0.replace(name="s1", grow="depth", model=s0.model.replace(n_layers=4), layout=s0.layout.replace(**b, ds_config=None))
            plan = base.replace(stages=(s0, s1))
            key = f"{flavour}-tp{b['tp']}-dp{b['dp']}-z{b['zero_stage']}"
            run = os.path.join(out, key)
            _copy_stage(src, run, "s0")
            r = {}
            try:
                r["rc"] = train_stage(plan, 1, run, quiet=True, stop_at=1)  # transition, eval at growth, 1 step
            except Exception as e:  # noqa: BLE001 - recorded for the assertion
                r["error"] = f"{type(e).__name__}: {e}"
            torch.distributed.barrier()
            if b == dict(tp=1, dp=2, zero_stage=3) and "error" not in r:  # the same step from a fresh engine
                again = run + "-loaded"
                worker.copy_transition(run, again)
                train_stage(plan, 1, again, quiet=True, stop_at=1)
                torch.distributed.barrier()
                if RANK == 0:
                    r["loss_loaded"] = [x["loss"] for x in _records(again, "s1") if "loss" in x]
            if RANK == 0 and "error" not in r:
                recs = _records(run, "s1")
                r["evals"] = {x["at"]: x["eval_loss"] for x in recs if "eval_loss" in x}
                r["loss"] = [x["loss"] for x in recs if "loss" in x]
            res["cases"][key] = r
    # a non-finite eval at growth stops the stage (the eval forced to NaN, the weights are fine)
    from megagrow.errors import MegagrowError
    from megagrow.metrics import meter

    s1 = s0.replace(name="s1", grow="depth", model=s0.model.replace(n_layers=4), layout=s0.layout.replace(zero_stage=3))
    plan = base.replace(stages=(s0, s1))
    run = os.path.join(out, "nan")
    _copy_stage(src, run, "s0")
    real = meter.StageMeter.evaluate
    meter.StageMeter.evaluate = lambda self, engine: float("nan")
    try:
        res["nan"] = {"rc": train_stage(plan, 1, run, quiet=True, stop_at=1)}
    except MegagrowError as e:
        res["nan"] = {"error": str(e), "type": type(e).__name__, "exit_code": e.exit_code}
    finally:
        meter.StageMeter.evaluate = real
    torch.distributed.barrier()
    if RANK == 0:
        res["nan"]["train_records"] = [x for x in _records(run, "s1") if "loss" in x]
    return res


if __name__ == "__main__":
    prefix, out = sys.argv[1:3]
    result = growth_eval(prefix, out)
    if RANK == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
