"""megagrow's DeepSpeed engine step vs several plain PyTorch loops on one GPU.

`megagrow bench` (bench/gpu/check.sh runs it) times the engine against one plain loop, fp32
weights with bf16 autocast on the device. This script keeps the wider comparison the
ZeRO-stage study in bench/gpu/README.md was measured with (zero_variants.sh runs it): foreach and
fused AdamW, and pure bf16 weights without a master copy.

Here, one process, DP=1, TP=1, the stage's whole global batch as one micro-batch (the same
`single_process_stage` megagrow.bench uses), the same initial weights (build_model, plan seed),
the same sample stream (Batches, each loop with its own step counter, so every loop sees the
same batches in the same order), the same LR schedule, AdamW hyper-parameters, param groups
and grad clipping. Loops timed:

  megagrow     build(plan) -> DeepSpeed engine: bf16 params, ZeRO stage from the plan,
               fp32 master weights and fp32 grad accumulation, torch AdamW (torch_adam)
  plain_amp    fp32 params on the GPU, torch.autocast(bfloat16) forward, fp32 grads,
               torch.optim.AdamW (default foreach implementation), clip_grad_norm_
               -> the plain equivalent of DeepSpeed bf16 (fp32 master + bf16 compute)
  plain_amp_fused  as plain_amp with AdamW(fused=True)
  plain_bf16   bf16 params, no autocast, AdamW directly on the bf16 params (no fp32 master),
               clip_grad_norm_ -> a lower bound on the work, not numerically equivalent

Each step: set LR, fetch batch (memmap -> device), forward, backward, clip, optimizer step,
zero grads; then torch.cuda.synchronize(). Blocks of `--block` steps, loops alternated,
after `--warmup` untimed steps each. Median step time per loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import traceback

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("plan")
    ap.add_argument("--data")
    ap.add_argument("--stage", default="0")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak", type=float, default=989e12, help="dense bf16 peak FLOP/s for MFU (H100 SXM: 989e12)")
    ap.add_argument("--loops", default="megagrow,plain_amp,plain_amp_fused,plain_bf16")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)

    from megagrow.bench import single_process_stage
    from megagrow.config import load_plan
    from megagrow.model.gpt import build_model
    from megagrow.parallel.engine import param_groups
    from megagrow.parallel.groups import init_distributed
    from megagrow.schedule.lr import LRSchedule
    from megagrow.data.batches import Batches, dropout_seed
    from megagrow.parallel.engine import build_stage as build
    from megagrow.train.step import train_step

    plan = load_plan(args.plan)
    if args.data:
        plan = dataclasses.replace(plan, data=plan.data.replace(prefix=args.data))
    k = plan.stages.index(plan.stage(args.stage))
    p1 = single_process_stage(plan, k)
    stage = p1.stages[k]
    L, o, m = stage.layout, stage.optim, stage.model
    init_distributed(stage.layout)

    engine, ds_opt = build(p1, k)
    dev = engine.device
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    batches = Batches.open(p1, stage, 0, 1)
    sched = LRSchedule.from_optim(o, stage.steps)
    B = L.global_batch

    def opt_for(model, fused=False):
        kw = {"fused": True} if fused else {}
        return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kw)

    loops = {}
    losses = {}

    def make_megagrow():
        st = {"i": 0}

        def step():  # the trainer's own step (megagrow/train/step.py), one micro-batch
            i = st["i"]
            loss = train_step(engine, ds_opt, batches, p1.seed, 1, i * B, sched(i), dev)
            st["i"] = i + 1
            return loss

        engine.train()
        return step

    def make_plain(dtype, autocast, fused):
        model = build_model(m, p1.seed, dtype).to(dev)
        model.train()
        opt = opt_for(model, fused)
        st = {"i": 0}

        def step():
            i = st["i"]
            for g in opt.param_groups:
                g["lr"] = sched(i)
            x, y, g0 = batches.micro(i * B, 0, dev)
            model.set_dropout_seed(dropout_seed(p1.seed, g0))
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(x, y)
            loss.backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            st["i"] = i + 1
            return loss.detach()

        return step

    want = args.loops.split(",")
    makers = {
        "megagrow": make_megagrow,
        "plain_amp": lambda: make_plain(torch.float32, True, False),
        "plain_amp_fused": lambda: make_plain(torch.float32, True, cuda),  # fused AdamW is GPU-only
        "plain_bf16": lambda: make_plain(torch.bfloat16, False, False),
    }
    errors = {}
    for name in want:
        try:
            loops[name] = makers[name]()
            losses[name] = []
        except Exception as e:  # a failing loop is reported, the others still run
            traceback.print_exc()
            errors[name] = f"build: {type(e).__name__}: {e}"

    # data fetch alone (included in every loop's step)
    t = []
    for i in range(5):
        sync(); t0 = time.perf_counter()
        batches.micro(i * B, 0, dev)
        sync(); t.append(time.perf_counter() - t0)
    data_s = statistics.median(t)

    for name, fn in list(loops.items()):  # warm-up (untimed, losses recorded)
        try:
            for _ in range(args.warmup):
                losses[name].append(float(fn()))
        except Exception as e:
            traceback.print_exc()
            errors[name] = f"warm-up: {type(e).__name__}: {e}"
            del loops[name]
    sync()
    times = {n: [] for n in loops}
    done = 0
    while done < args.steps:
        for name, fn in loops.items():
            for _ in range(args.block):
                sync()
                t0 = time.perf_counter()
                loss = fn()
                sync()
                times[name].append(time.perf_counter() - t0)
                losses[name].append(float(loss))
        done += args.block

    tokens = B * m.seq_len
    n_total = m.num_params()
    n_nonemb = m.num_params(embeddings=False)
    attn_per_tok = 12 * m.n_layers * m.d_model * m.seq_len
    res = {
        "device": torch.cuda.get_device_name(dev) if cuda else str(dev),
        "torch": torch.__version__,
        "model": m.to_dict(),
        "params_total": n_total,
        "params_non_embedding": n_nonemb,
        "layout": L.to_dict(),
        "tokens_per_step": tokens,
        "steps_each": args.steps,
        "warmup_each": args.warmup,
        "data_fetch_s": data_s,
        "flop_per_token_6N": 6 * n_total,
        "flop_per_token_6N_plus_attn": 6 * n_total + attn_per_tok,
        "peak_flops": args.peak,
        "errors": errors,
        "loops": {},
    }
    for name in loops:
        med = statistics.median(times[name])
        tps = tokens / med
        res["loops"][name] = {
            "median_step_s": med,
            "min_step_s": min(times[name]),
            "max_step_s": max(times[name]),
            "tokens_per_s": tps,
            "mfu_6N": 6 * n_total * tps / args.peak,
            "mfu_6N_plus_attn": (6 * n_total + attn_per_tok) * tps / args.peak,
            "loss_first": losses[name][0],
            "loss_last": losses[name][-1],
            "losses": losses[name],
        }
    base = res["loops"].get("megagrow")
    if base:
        for name, r in res["loops"].items():
            r["megagrow_over_this"] = base["median_step_s"] / r["median_step_s"]
    if cuda:
        res["max_memory_allocated_GiB"] = torch.cuda.max_memory_allocated(dev) / 2**30
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "loops"}))
    print(f"{'loop':>16} {'median_ms':>10} {'min_ms':>8} {'max_ms':>8} {'tok/s':>10} {'MFU6N':>7} {'MFU+attn':>8} "
          f"{'mg/this':>7} {'loss0':>7} {'lossN':>7}")
    for name, r in res["loops"].items():
        print(f"{name:>16} {r['median_step_s']*1e3:10.2f} {r['min_step_s']*1e3:8.2f} {r['max_step_s']*1e3:8.2f} "
              f"{r['tokens_per_s']:10.0f} {r['mfu_6N']:7.3f} {r['mfu_6N_plus_attn']:8.3f} "
              f"{r.get('megagrow_over_this', float('nan')):7.3f} {r['loss_first']:7.4f} {r['loss_last']:7.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
