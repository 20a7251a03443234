"""One row of `megagrow bench`: a stage's engine (and the plain PyTorch loop beside it) built, warmed up
and timed in alternating blocks of steps; step times, tokens/s, TFLOP/s, MFU, peak memory, phases."""

from __future__ import annotations

import gc
import math
import statistics
import time

import torch

from megagrow import collectives
from megagrow.bench.loops import MegagrowLoop, PhaseTimer, PlainDDPLoop
from megagrow.config import Plan


def sync_fn(device):
    return (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def free(device) -> None:
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


def row_header(plan: Plan, k: int, overlap: bool | None) -> dict:
    """What a row measures: the layout, the model's size and FLOPs, and the MFU options as they resolve for
    this stage (compile: the stage's setting and whether the blocks are compiled; overlap: whether the
    DeepSpeed config ends with overlap_comm on)."""
    from megagrow.metrics.flops import flops_per_token, megatron_flops_per_token
    from megagrow.parallel.engine import compile_on, ds_config

    stage = plan.stages[k]
    L, m = stage.layout, stage.model
    return {
        "stage": stage.name,
        "activation_checkpointing": stage.activation_checkpointing,
        "fused_qkv": stage.fused_qkv,
        "compile": stage.compile,
        "compiled": compile_on(stage),
        "chunked_loss": stage.chunked_loss,
        "overlap": bool(ds_config(stage, overlap)["zero_optimization"].get("overlap_comm", False)),
        "tp": L.tp,
        "dp": L.dp,
        "zero_stage": L.zero_stage,
        "micro_batch": L.micro_batch,
        "grad_accum": L.grad_accum,
        "dtype": L.dtype,
        "ds_config": L.ds_config,
        "world_size": L.world_size,
        "params": m.num_params(),
        "params_non_embedding": m.num_params(embeddings=False),
        "tokens_per_step": L.global_batch * m.seq_len,
        "flops_per_token": flops_per_token(m),
        "flops_per_token_megatron": megatron_flops_per_token(m),
        "oom": False,
        "error": None,
    }


def _baseline_loop(
    plan: Plan, k: int, synthetic: bool, device, sync, phases: bool, warmup: int, baseline: bool, row: dict
) -> PlainDDPLoop | None:
    """The plain PyTorch loop beside megagrow's, warmed up (none at tp > 1 or with --no-baseline)."""
    if baseline and plan.stages[k].layout.tp == 1:
        plain = PlainDDPLoop(plan, k, synthetic, device, PhaseTimer(sync, phases))
        for _ in range(warmup):
            plain.step()
        row["baseline"] = plain.kind
        return plain
    row["baseline"] = None if baseline else "off (--no-baseline)"
    if baseline:
        row["baseline_note"] = "no plain loop at tp > 1"
    return None


def _time_blocks(loops: list, steps: int, block: int, sync, losses: list) -> tuple[dict, dict]:
    """`steps` timed steps of each loop, in alternating blocks of `block`: wall and process CPU time
    (all threads: robust to a busy machine) of each step, synchronised around it; megagrow's losses."""
    times = {lp.name: [] for lp in loops}
    cpu = {lp.name: [] for lp in loops}
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
                if lp.name == "megagrow":
                    losses.append(loss)
        done += n
    return times, cpu


def _fill_rates(row: dict, times: dict, cpu: dict, losses: list, peak: float | None, device) -> None:
    t_mg = _slowest_rank(times["megagrow"], device)
    med = statistics.median(t_mg)
    tps = row["tokens_per_step"] / med
    world = row["world_size"]
    row.update(
        {
            "step_time_s": med,
            "step_time_p10_s": _pct(t_mg, 0.1),
            "step_time_p90_s": _pct(t_mg, 0.9),
            "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / world,
            "tflops_per_device": tps * row["flops_per_token"] / world / 1e12,
            "tflops_per_device_megatron": tps * row["flops_per_token_megatron"] / world / 1e12,
            "peak_tflops": peak,
        }
    )
    row["mfu"] = None if not peak else row["tflops_per_device"] / peak
    row["mfu_megatron"] = None if not peak else row["tflops_per_device_megatron"] / peak
    ls = torch.stack(losses).tolist() if losses else []
    row["loss_first"], row["loss_last"] = (ls[0], ls[-1]) if ls else (None, None)
    row["step_cpu_time_s"] = statistics.median(_slowest_rank(cpu["megagrow"], device))


def _fill_baseline(row: dict, plain: PlainDDPLoop | None, times: dict, cpu: dict, steps: int, device) -> None:
    if plain is None:
        row["baseline_step_time_s"] = row["ratio"] = row["baseline_phases_s"] = None
        row["baseline_step_cpu_time_s"] = row["cpu_time_ratio"] = None
        return
    row["baseline_step_time_s"] = statistics.median(_slowest_rank(times["plain"], device))
    row["ratio"] = row["step_time_s"] / row["baseline_step_time_s"]
    row["baseline_step_cpu_time_s"] = statistics.median(_slowest_rank(cpu["plain"], device))
    row["cpu_time_ratio"] = row["step_cpu_time_s"] / row["baseline_step_cpu_time_s"]
    row["baseline_phases_s"] = _phases(plain.timer, steps, device)


def bench_row(
    plan: Plan,
    k: int,
    steps: int,
    warmup: int,
    block: int,
    synthetic: bool,
    baseline: bool,
    peak_override: float | None,
    phases: bool,
    overlap: bool | None = None,
) -> dict:
    """Benchmark stage k of `plan` at its layout (process groups re-initialised for it). overlap: the
    gradient-reduction overlap of the DeepSpeed config (None: its default, on NCCL at DP > 1)."""
    from megagrow.metrics.flops import device_name, peak_memory_gb, peak_tflops
    from megagrow.parallel.groups import init_distributed

    row = row_header(plan, k, overlap)
    init_distributed(plan.stages[k].layout)
    mg = plain = device = None
    try:
        mg = MegagrowLoop(plan, k, synthetic, PhaseTimer(lambda: None, False), overlap=overlap)
        device = mg.device
        sync = sync_fn(device)
        mg.timer.sync, mg.timer.on = sync, phases
        row["device"] = device_name(device)
        losses = [mg.step() for _ in range(warmup)]
        sync()
        row["peak_mem_gb"] = peak_memory_gb(device)  # the engine's own peak, before a plain loop exists
        plain = _baseline_loop(plan, k, synthetic, device, sync, phases, warmup, baseline, row)
        loops = [mg] + ([plain] if plain is not None else [])
        for lp in loops:
            lp.timer.phases.clear()
        times, cpu = _time_blocks(loops, steps, block, sync, losses)
        row.update(steps=steps, warmup=warmup)
        _fill_rates(row, times, cpu, losses, peak_tflops(device, plan.stages[k].layout.dtype, peak_override), device)
        row["phases_s"] = _phases(mg.timer, steps, device)
        _fill_baseline(row, plain, times, cpu, steps, device)
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
            free(device)
    return row
