"""`megagrow bench`: throughput, TFLOP/s, MFU and overhead of one stage of a plan.

    torchrun --nproc_per_node=W -m megagrow.cli bench PLAN --stage K [--steps 20] [--warmup 3] [--json]
        [--synthetic] [--sweep micro_batch=1,2,4 --sweep zero_stage=1,2] [--transition] [--peak-tflops X]

Run like `megagrow train` (torchrun or srun, one process per rank; W = tp x dp of the stage, or
of every --sweep row: a swept `tp` takes dp = W / tp). Each row: build the stage's DeepSpeed
engine, `--warmup` untimed steps, then `--steps` timed steps (device-synchronised around each
step; the step time is the slowest rank's), real tokens from the plan's dataset or, with
--synthetic, random ones. Reported per row: step time median / p10 / p90, tokens/s (total and
per device), TFLOP/s per device and MFU on megagrow's convention (6 N_nonembedding + 12 L a s
per token, megagrow/metrics/flops.py) and on Megatron-LM's formula, peak memory (CUDA
allocator peak, or peak RSS on CPU) and the loss.

Beside it, the plain PyTorch loop of the same model, batches, LR schedule, AdamW settings and
clipping (torch DDP over the DP group when dp > 1; fp32 weights + bf16 autocast on a GPU for a
bf16 stage), timed in alternating blocks of `--block` steps so machine noise hits both; the
ratio megagrow / plain is the framework's overhead. (TP > 1 rows have no plain loop.)

A row that runs out of device memory is reported as OOM, and the sweep goes on.

--transition measures the transition into stage K (K >= 1, same world size as stage K-1): save
of stage K-1, grow + reshard (megagrow's shard-to-shard executor), building stage K's engine
and loading, the first step; beside a same-layout save + resume (build + load) + first step of
stage K, as a ratio. In-process work only: a real transition also starts new processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from megagrow import collectives
from megagrow.bench.loops import MegagrowLoop, PhaseTimer, PlainDDPLoop, stage_batches
from megagrow.config import Plan, load_plan
from megagrow.errors import UserError, cli_entry
from megagrow.paths import RunPaths

CONVENTION = "6*N_nonembedding + 12*L*attn_dim*seq_len FLOPs per token (attention without causal halving, no recompute)"


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "on", "yes"):
        return True
    if v.lower() in ("0", "false", "off", "no"):
        return False
    raise ValueError(v)


SWEEP_KEYS = {"micro_batch": int, "grad_accum": int, "zero_stage": int, "tp": int, "dtype": str, "ds_config": str,
              "activation_checkpointing": _bool}
STAGE_KEYS = ("activation_checkpointing",)  # swept on the stage, the others on its layout


# --------------------------------------------------------------------------------------
# one row


def _sync_fn(device):
    return (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _slowest_rank(times: list[float], device) -> list[float]:
    """Each step's time as the slowest rank saw it."""
    t = torch.tensor(times, dtype=torch.float64, device=device)
    collectives.all_reduce(t, op="max")
    return t.tolist()


def _phases(timer: PhaseTimer, steps: int, device) -> dict | None:
    if not timer.on:
        return None
    names = sorted(timer.phases)
    t = torch.tensor([timer.phases[n] for n in names], dtype=torch.float64, device=device)
    collectives.all_reduce(t, op="max")
    return {n: v / steps for n, v in zip(names, t.tolist())}


def bench_row(plan: Plan, k: int, steps: int, warmup: int, block: int, synthetic: bool, baseline: bool,
              peak_override: float | None, phases: bool) -> dict:
    """Benchmark stage k of `plan` at its layout (process groups re-initialised for it)."""
    from megagrow.metrics.flops import (device_name, flops_per_token, megatron_flops_per_token, peak_memory_gb,
                                        peak_tflops)
    from megagrow.parallel.groups import init_distributed

    stage = plan.stages[k]
    L, m = stage.layout, stage.model
    world = L.world_size
    row = {"stage": stage.name, "activation_checkpointing": stage.activation_checkpointing, "tp": L.tp, "dp": L.dp, "zero_stage": L.zero_stage, "micro_batch": L.micro_batch,
           "grad_accum": L.grad_accum, "dtype": L.dtype, "ds_config": L.ds_config, "world_size": world,
           "params": m.num_params(), "params_non_embedding": m.num_params(embeddings=False),
           "tokens_per_step": L.global_batch * m.seq_len, "flops_per_token": flops_per_token(m),
           "flops_per_token_megatron": megatron_flops_per_token(m), "oom": False, "error": None}
    init_distributed(L)
    mg = plain = None
    device = None
    try:
        mg_timer = PhaseTimer(lambda: None, False)
        mg = MegagrowLoop(plan, k, synthetic, mg_timer)
        device = mg.device
        sync = _sync_fn(device)
        mg_timer.sync, mg_timer.on = sync, phases
        row["device"] = device_name(device)
        peak = peak_tflops(device, L.dtype, peak_override)
        losses = []
        for _ in range(warmup):
            losses.append(mg.step())
        sync()
        row["peak_mem_gb"] = peak_memory_gb(device)  # the engine's own peak, before a plain loop exists
        loops = [mg]
        if baseline and L.tp == 1:
            pl_timer = PhaseTimer(sync, phases)
            plain = PlainDDPLoop(plan, k, synthetic, device, pl_timer)
            for _ in range(warmup):
                plain.step()
            loops.append(plain)
            row["baseline"] = plain.kind
        else:
            row["baseline"] = None if baseline else "off (--no-baseline)"
            if baseline:
                row["baseline_note"] = "no plain loop at tp > 1"
        mg_timer.phases.clear()
        if plain is not None:
            plain.timer.phases.clear()
        times = {lp.name: [] for lp in loops}
        cpu = {lp.name: [] for lp in loops}  # process CPU time a step (all threads): robust to a busy machine
        done = 0
        while done < steps:
            n = min(block, steps - done)
            for lp in loops:
                for _ in range(n):
                    collectives.barrier()
                    sync()
                    t0, c0 = time.perf_counter(), time.process_time()
                    loss = lp.step()
                    sync()
                    times[lp.name].append(time.perf_counter() - t0)
                    cpu[lp.name].append(time.process_time() - c0)
                    if lp is mg:
                        losses.append(loss)
            done += n
        t_mg = _slowest_rank(times["megagrow"], device)
        med = statistics.median(t_mg)
        tps = row["tokens_per_step"] / med
        row.update({
            "steps": steps, "warmup": warmup,
            "step_time_s": med, "step_time_p10_s": _pct(t_mg, 0.1), "step_time_p90_s": _pct(t_mg, 0.9),
            "tokens_per_s": tps, "tokens_per_s_per_device": tps / world,
            "tflops_per_device": tps * row["flops_per_token"] / world / 1e12,
            "tflops_per_device_megatron": tps * row["flops_per_token_megatron"] / world / 1e12,
            "peak_tflops": peak,
        })
        row["mfu"] = None if not peak else row["tflops_per_device"] / peak
        row["mfu_megatron"] = None if not peak else row["tflops_per_device_megatron"] / peak
        ls = torch.stack(losses).tolist() if losses else []
        row["loss_first"], row["loss_last"] = (ls[0], ls[-1]) if ls else (None, None)
        row["phases_s"] = _phases(mg_timer, steps, device)
        row["step_cpu_time_s"] = statistics.median(_slowest_rank(cpu["megagrow"], device))
        if plain is not None:
            t_pl = _slowest_rank(times["plain"], device)
            row["baseline_step_time_s"] = statistics.median(t_pl)
            row["ratio"] = med / row["baseline_step_time_s"]
            row["baseline_step_cpu_time_s"] = statistics.median(_slowest_rank(cpu["plain"], device))
            row["cpu_time_ratio"] = row["step_cpu_time_s"] / row["baseline_step_cpu_time_s"]
            row["baseline_phases_s"] = _phases(plain.timer, steps, device)
        else:
            row["baseline_step_time_s"] = row["ratio"] = row["baseline_phases_s"] = None
            row["baseline_step_cpu_time_s"] = row["cpu_time_ratio"] = None
    except Exception as e:  # noqa: BLE001 - an OOM row is a result, not a crash
        if not _is_oom(e):
            raise
        row["oom"] = True
        row["error"] = f"out of memory: {str(e).splitlines()[0][:200]}"
    finally:
        for lp in (plain, mg):
            if lp is not None:
                lp.close()
        mg = plain = None
        if device is not None:
            _free(device)
    return row


# --------------------------------------------------------------------------------------
# sweep and transition


def parse_sweeps(specs: list[str]) -> list[dict]:
    """--sweep key=v1,v2 ... -> the grid of layout overrides (first key varies slowest)."""
    grid = [{}]
    seen = set()
    for spec in specs:
        key, eq, vals = spec.partition("=")
        key = key.strip()
        if not eq or not vals:
            raise UserError(f"--sweep {spec!r}: expected KEY=V1,V2,... (keys: {', '.join(SWEEP_KEYS)})")
        if key not in SWEEP_KEYS:
            raise UserError(f"--sweep {spec!r}: unknown key {key!r} (keys: {', '.join(SWEEP_KEYS)})")
        if key in seen:
            raise UserError(f"--sweep: key {key!r} given twice")
        seen.add(key)
        try:
            values = [SWEEP_KEYS[key](v.strip()) for v in vals.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--sweep {spec!r}: {key} takes {SWEEP_KEYS[key].__name__} values") from None
        grid = [{**g, key: v} for g in grid for v in values]
    return grid


def row_plan(plan: Plan, k: int, over: dict, world: int) -> Plan:
    """Stage k with one sweep row's overrides; tp fixes dp = world / tp."""
    st = plan.stages[k]
    kw = {key: v for key, v in over.items() if key not in STAGE_KEYS}
    stage_kw = {key: v for key, v in over.items() if key in STAGE_KEYS}
    if "tp" in kw:
        if world % kw["tp"]:
            raise UserError(f"--sweep tp={kw['tp']} does not divide the world size {world}")
        kw["dp"] = world // kw["tp"]
    if "zero_stage" in kw and "ds_config" not in kw and st.layout.ds_config:
        from megagrow.parallel.engine import resolve_ds_config

        with open(resolve_ds_config(st.layout.ds_config)) as f:
            js = json.load(f).get("zero_optimization", {}).get("stage")
        if js is not None and js != kw["zero_stage"]:
            kw["ds_config"] = None  # the stage's JSON is for another ZeRO stage: DeepSpeed's defaults
    try:
        new = st.replace(layout=st.layout.replace(**kw), **stage_kw)
    except UserError as e:
        raise UserError(f"--sweep {over}: {e}") from None
    new.layout.check_world(world, f"--sweep {over}")
    return plan.replace(stages=tuple(new if i == k else s for i, s in enumerate(plan.stages)))


def bench_transition(plan: Plan, k: int, synthetic: bool) -> dict:
    """Transition into stage k (save k-1, grow + reshard, build + load k, first step) vs a
    same-layout save + resume of stage k, each phase timed (slowest rank)."""
    from megagrow.parallel.groups import init_distributed
    from megagrow.state import manifest
    from megagrow.state.record import StageRecord
    from megagrow.train.transition import transition as do_transition

    if k < 1:
        raise UserError("--transition needs a stage that grows from a previous one (--stage 1 or later)")
    prev, stage = plan.stages[k - 1], plan.stages[k]
    if prev.layout.world_size != stage.layout.world_size:
        raise UserError(f"--transition runs both stages in one launch: stage {prev.name!r} needs {prev.layout.world_size} "
                        f"processes, {stage.name!r} {stage.layout.world_size}")
    rank = torch.distributed.get_rank()
    root = tempfile.mkdtemp(prefix="megagrow-bench-") if rank == 0 else None
    obj = [root]
    collectives.broadcast_object_list(obj, src=0)
    root = obj[0]
    # the source stage ends at its first step: transition() checks it is finished
    src_plan = plan.replace(stages=tuple(s.replace(steps=1) if i == k - 1 else s for i, s in enumerate(plan.stages)))
    phases: dict[str, dict] = {"transition": {}, "resume": {}}

    def timed(kind: str, name: str, fn):
        collectives.barrier()
        t0 = time.perf_counter()
        out = fn()
        collectives.barrier()
        phases[kind][name] = time.perf_counter() - t0
        return out

    def stage_dir(p: Plan, i: int) -> str:
        return RunPaths(root).stage(p.stages[i].name).ckpt

    def save(engine, p: Plan, i: int, step: int):
        manifest.save_record(engine, stage_dir(p, i), StageRecord(p, i, step=step))

    try:
        # transition path
        init_distributed(prev.layout)
        lp = MegagrowLoop(src_plan, k - 1, synthetic, PhaseTimer(lambda: None, False))
        lp.step()
        timed("transition", "save", lambda: save(lp.engine, src_plan, k - 1, 1))
        lp.close()
        _free(lp.device)
        init_distributed(stage.layout)
        timed("transition", "grow_reshard", lambda: do_transition(src_plan, k, root, quiet=True))
        eng = timed("transition", "build_load", lambda: _build_load(src_plan, k, stage_dir(src_plan, k)))
        timed("transition", "first_step", lambda: _first_step(eng, src_plan, k, synthetic))
        eng.destroy()
        # same-layout save + resume of stage k
        lp = MegagrowLoop(src_plan, k, synthetic, PhaseTimer(lambda: None, False))
        lp.step()
        rdir = os.path.join(root, "resume")
        timed("resume", "save", lambda: manifest.save_record(lp.engine, rdir, StageRecord(src_plan, k, step=1)))
        lp.close()
        eng = timed("resume", "build_load", lambda: _build_load(src_plan, k, rdir))
        timed("resume", "first_step", lambda: _first_step(eng, src_plan, k, synthetic))
        eng.destroy()
    finally:
        collectives.barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    t_tr, t_rs = sum(phases["transition"].values()), sum(phases["resume"].values())
    return {"from": prev.name, "to": stage.name, "grow": stage.grow, "transition_s": phases["transition"],
            "resume_s": phases["resume"], "transition_total_s": t_tr, "resume_total_s": t_rs, "ratio": t_tr / t_rs,
            "params_from": prev.model.num_params(), "params_to": stage.model.num_params()}


def _build_load(plan: Plan, k: int, ckpt: str):
    from megagrow.parallel.engine import build_stage as build

    engine, _ = build(plan, k)
    engine.load_checkpoint(ckpt)
    return engine


def _first_step(engine, plan: Plan, k: int, synthetic: bool):
    """The trainer's step (train_step) at step 0, on an engine just built or grown."""
    from megagrow.parallel.groups import dp_rank_size
    from megagrow.schedule.lr import LRSchedule
    from megagrow.train.step import train_step

    stage = plan.stages[k]
    dp_rank, dp_size = dp_rank_size()
    b = stage_batches(plan, stage, dp_rank, dp_size, synthetic)
    engine.train()
    train_step(engine, engine.optimizer, b, plan.seed, stage.layout.grad_accum, 0,
               LRSchedule.from_optim(stage.optim, stage.steps)(0), engine.device)
    _sync_fn(engine.device)()


# --------------------------------------------------------------------------------------
# output


def format_table(res: dict) -> str:
    rows = res["rows"]
    lines = [f"megagrow bench {res['plan']} stage {res['stage']} on {res['device']} x{res['world_size']} "
             f"({'synthetic' if res['synthetic'] else 'real'} tokens)",
             f"FLOPs/token: {CONVENTION}; 'megatron' columns: Megatron-LM's formula (adds the logit GEMM)"]
    head = ["tp", "dp", "zero", "mb", "ga", "dtype", "step ms (p10-p90)", "tok/s", "tok/s/dev", "TFLOP/s/dev",
            "megatron", "MFU", "peak GB", "plain ms", "ratio", "cpu-time ratio"]
    extra = [(k, lbl) for k, lbl in (("ds_config", "ds_config"), ("activation_checkpointing", "ckpt"))
             if any(r.get(k) not in (None, False, "none") for r in rows)]  # only when some row sets them
    head = head[:6] + [lbl for _, lbl in extra] + head[6:]
    table = [head]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        base = [str(r["tp"]), str(r["dp"]), str(r["zero_stage"]), str(r["micro_batch"]), str(r["grad_accum"]), r["dtype"]]
        base += [os.path.basename(str(r.get(k))) if k == "ds_config" else str({True: "full", False: "none", None: "none"}.get(r.get(k), r.get(k))) for k, _ in extra]
        if r["oom"]:
            table.append(base + ["OOM"] + [""] * (len(head) - len(base) - 1))
            continue
        table.append(base + [
            f"{r['step_time_s'] * 1e3:.1f} ({r['step_time_p10_s'] * 1e3:.0f}-{r['step_time_p90_s'] * 1e3:.0f})",
            f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s_per_device']:.0f}", f(r["tflops_per_device"], ".4g"),
            f(r["tflops_per_device_megatron"], ".4g"), "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            f(r["peak_mem_gb"], ".2f"), "-" if r["baseline_step_time_s"] is None else f"{r['baseline_step_time_s'] * 1e3:.1f}",
            f(r["ratio"], ".3f"), f(r["cpu_time_ratio"], ".3f")])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    for r in rows:
        if not r["oom"] and r.get("baseline"):
            lines.append(f"plain loop: {r['baseline']}")
            break
    for r in rows:
        if r.get("phases_s"):
            ph = ", ".join(f"{n} {v * 1e3:.1f}" for n, v in r["phases_s"].items())
            bp = r.get("baseline_phases_s")
            bps = "" if not bp else "; plain: " + ", ".join(f"{n} {v * 1e3:.1f}" for n, v in bp.items())
            lines.append(f"phases ms/step (tp{r['tp']} dp{r['dp']} z{r['zero_stage']} mb{r['micro_batch']}): megagrow: {ph}{bps}")
    tr = res.get("transition")
    if tr:
        ph = lambda d: ", ".join(f"{n} {v:.2f}" for n, v in d.items())  # noqa: E731
        lines.append(f"transition {tr['from']} -> {tr['to']} ({tr['grow']}): {tr['transition_total_s']:.2f} s "
                     f"[{ph(tr['transition_s'])}]")
        lines.append(f"same-layout save + resume of {tr['to']}: {tr['resume_total_s']:.2f} s [{ph(tr['resume_s'])}]; "
                     f"ratio {tr['ratio']:.2f}")
    return "\n".join(lines)


@cli_entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megagrow bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", help="stage plan YAML")
    p.add_argument("--stage", default="0", help="stage index or name (default 0)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row and loop (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--block", type=int, default=5, help="steps per block when alternating with the plain loop (default 5)")
    p.add_argument("--data", help="override the plan's dataset prefix")
    p.add_argument("--synthetic", action="store_true", help="random tokens instead of the dataset")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help=f"one row per value (repeatable, a grid): {', '.join(SWEEP_KEYS)}")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain PyTorch loop")
    p.add_argument("--phases", action="store_true",
                   help="also time data / forward / backward / step per step (syncs inside the step)")
    p.add_argument("--transition", action="store_true", help="also time the transition into --stage (see above)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s of one device for MFU (default: from the device table)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="also write the JSON to this file")
    args = p.parse_args(argv)
    for name in ("steps", "block"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    if args.warmup < 0:
        raise UserError("--warmup must be >= 0")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UserError("--peak-tflops must be positive")
    plan = load_plan(args.plan)
    if args.data:
        plan = dataclasses.replace(plan, data=plan.data.replace(prefix=args.data))
    k = plan.stages.index(plan.stage(args.stage))
    grid = parse_sweeps(args.sweep)
    from megagrow.parallel.groups import _env_rank

    rank, world, _ = _env_rank()
    plans = [row_plan(plan, k, over, world) for over in grid]  # every row checked before any runs
    if not args.synthetic:
        from megagrow.data.batches import Batches

        Batches.open(plan, plan.stages[k], 0, 1)  # a missing dataset is an error before any engine
    rows = []
    from tqdm import tqdm

    for p_row in tqdm(plans, desc="bench", disable=rank != 0 or len(plans) == 1 or args.json, file=sys.stderr):
        rows.append(bench_row(p_row, k, args.steps, args.warmup, args.block, args.synthetic, not args.no_baseline,
                              args.peak_tflops, args.phases))
    dev = next((r["device"] for r in rows if "device" in r), "?")
    res = {"plan": plan.name, "stage": plan.stages[k].name, "device": dev, "world_size": world, "synthetic": args.synthetic,
           "convention": CONVENTION, "rows": rows}
    if args.transition:
        res["transition"] = bench_transition(plan, k, args.synthetic)
    if rank == 0:
        if args.out:
            from megagrow.fsutil import write_json_atomic

            write_json_atomic(args.out, res)
        print(json.dumps(res) if args.json else format_table(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
