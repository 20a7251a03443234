"""Benchmarks, and the plain-PyTorch reference loop that tests compare the trainer against.

    megagrow bench overhead PLAN [--stage K] [--steps N] [--json]

`overhead` measures, in one process and side by side (alternating blocks of steps so
machine noise hits both), the step time of megagrow's DeepSpeed engine at DP=1/TP=1 and of
a plain PyTorch loop (torch.optim.AdamW, clip_grad_norm_) on the same model and batches,
and reports the ratio megagrow / plain.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

from megagrow.config import Plan, load_plan
from megagrow.errors import UserError, cli_entry


def single_process_stage(plan: Plan, k: int, **layout_overrides) -> Plan:
    """The plan with stage k run at DP=1, TP=1, the whole global batch as one micro-batch."""
    st = plan.stages[k]
    L = st.layout
    lay = L.replace(tp=1, dp=1, micro_batch=L.global_batch, grad_accum=1, **layout_overrides)
    stages = list(plan.stages)
    stages[k] = dataclasses.replace(st, layout=lay)
    return dataclasses.replace(plan, stages=tuple(stages))


class PlainLoop:
    """The reference: the same model, AdamW, clipping, LR schedule and samples, no DeepSpeed.

    Needs megatron parallel_state initialised with tp=1 (any DP size; it runs on one rank).
    """

    def __init__(self, plan: Plan, k: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        from megagrow.model.gpt import build_model
        from megagrow.parallel.engine import param_groups
        from megagrow.schedule.lr import LRSchedule
        from megagrow.data.batches import Batches

        self.plan = single_process_stage(plan, k)
        self.stage = self.plan.stages[k]
        o = self.stage.optim
        self.device = torch.device(device)
        self.model = build_model(self.stage.model, plan.seed, dtype).to(self.device)
        self.opt = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.sched = LRSchedule.from_optim(o, self.stage.steps)
        self.batches = Batches.open(self.plan, self.stage, 0, 1)
        self.step_i = 0

    def step(self) -> float:
        from megagrow.data.batches import dropout_seed

        for g in self.opt.param_groups:
            g["lr"] = self.sched(self.step_i)
        first = self.step_i * self.stage.layout.global_batch
        x, y, g0 = self.batches.micro(first, 0, self.device)
        self.model.set_dropout_seed(dropout_seed(self.plan.seed, g0))
        loss = self.model(x, y)
        loss.backward()
        if self.stage.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.stage.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_i += 1
        return loss.item()


def overhead(plan: Plan, k: int, steps: int, block: int = 5) -> dict:
    from megagrow.parallel.engine import set_lr
    from megagrow.parallel.groups import init_distributed
    from megagrow.data.batches import Batches
    from megagrow.parallel.engine import build_stage as build

    p1 = single_process_stage(plan, k)
    stage = p1.stages[k]
    init_distributed(stage.layout)
    engine, optimizer = build(p1, k)
    # the same weights dtype as the engine's module (bf16 stages: bf16 weights, no fp32 master)
    plain = PlainLoop(plan, k, next(engine.module.parameters()).dtype, engine.device)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    batches = Batches.open(p1, stage, 0, 1)
    from megagrow.schedule.lr import LRSchedule

    sched = LRSchedule.from_optim(stage.optim, stage.steps)
    i_mg = 0

    def mg_step():
        nonlocal i_mg
        set_lr(optimizer, sched(i_mg))
        x, y, _ = batches.micro(i_mg * stage.layout.global_batch, 0, engine.device)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        i_mg += 1

    t_mg, t_plain = [], []
    for _ in range(2):  # warm-up
        mg_step()
        plain.step()
    done = 0
    while done < steps:
        for fn, out in ((mg_step, t_mg), (plain.step, t_plain)):
            for _ in range(block):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                out.append(time.perf_counter() - t0)
        done += block
    m_mg, m_plain = statistics.median(t_mg), statistics.median(t_plain)
    return {
        "stage": stage.name,
        "model_params": stage.model.num_params(),
        "global_batch": stage.layout.global_batch,
        "seq_len": stage.model.seq_len,
        "zero_stage": stage.layout.zero_stage,
        "steps_each": len(t_mg),
        "megagrow_step_s": m_mg,
        "plain_step_s": m_plain,
        "ratio": m_mg / m_plain,
        "device": str(engine.device),
    }


@cli_entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megagrow bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overhead", help="megagrow engine step vs plain PyTorch step, one process, side by side")
    o.add_argument("plan")
    o.add_argument("--stage", default="0")
    o.add_argument("--steps", type=int, default=30, help="timed steps for each loop (default 30)")
    o.add_argument("--data", help="override the plan's dataset prefix")
    o.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    plan = load_plan(args.plan)
    if args.data:
        plan = dataclasses.replace(plan, data=plan.data.replace(prefix=args.data))
    k = plan.stages.index(plan.stage(args.stage))
    if args.steps < 1:
        raise UserError("--steps must be >= 1")
    res = overhead(plan, k, args.steps)
    if args.json:
        print(json.dumps(res))
    else:
        for key, v in res.items():
            print(f"{key:>16}: {v:.4g}" if isinstance(v, float) else f"{key:>16}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
