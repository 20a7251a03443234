"""`megagrow bench`: throughput, TFLOP/s, MFU and overhead of one stage of a plan.

    torchrun --nproc_per_node=W -m megagrow.cli bench PLAN --stage K [--steps 20] [--warmup 3] [--json]
        [--synthetic] [--sweep micro_batch=1,2,4 --sweep zero_stage=1,2 | --options] [--transition] [--peak-tflops X]

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

--sweep also varies the MFU options (fused_qkv, compile, chunked_loss, activation_checkpointing: none /
attention / mlp / full, overlap: DeepSpeed's gradient-reduction overlap at DP > 1). --options runs them
side by side in one launch: the stage as it is (the base row), then one row per other value of each
option, the rest as in the base, with each row's median step time over the base row's.

--transition measures the transition into stage K (K >= 1, same world size as stage K-1): save
of stage K-1, grow + reshard (megagrow's shard-to-shard executor), building stage K's engine
and loading, the first step; beside a same-layout save + resume (build + load) + first step of
stage K, as a ratio. In-process work only: a real transition also starts new processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from megagrow.bench.rows import bench_row
from megagrow.bench.transition import bench_transition
from megagrow.config import COMPILE, RECOMPUTE, Plan, load_plan, recompute_mode
from megagrow.errors import UserError, cli_entry

CONVENTION = "6*N_nonembedding + 12*L*attn_dim*seq_len FLOPs per token (attention without causal halving, no recompute)"


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "on", "yes"):
        return True
    if v.lower() in ("0", "false", "off", "no"):
        return False
    raise ValueError(v)


def _recompute(v: str) -> str:
    """A recompute mode (none / attention / mlp / full; true / false read as full / none)."""
    if v.lower() in RECOMPUTE:
        return v.lower()
    return recompute_mode(_bool(v))


def _compile(v: str) -> str:
    if v.lower() in COMPILE:
        return v.lower()
    return "on" if _bool(v) else "off"


SWEEP_KEYS = {
    "micro_batch": int,
    "grad_accum": int,
    "zero_stage": int,
    "tp": int,
    "dtype": str,
    "ds_config": str,
    "activation_checkpointing": _recompute,
    "fused_qkv": _bool,
    "compile": _compile,
    "chunked_loss": _bool,
    "overlap": _bool,
}
STAGE_KEYS = ("activation_checkpointing", "fused_qkv", "compile", "chunked_loss")  # swept on the stage
ROW_KEYS = ("overlap",)  # given to the row's engine builder; the others are the stage's layout


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
    kw = {key: v for key, v in over.items() if key not in STAGE_KEYS + ROW_KEYS}
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


def option_rows(plan: Plan, k: int) -> list[dict]:
    """--options: the stage as it is (the base row), then one row per other value of each MFU option, the
    rest as in the base: fused_qkv, compile, chunked_loss, each other recompute mode, and overlap at DP > 1
    where DeepSpeed overlaps there (ZeRO-1/2, not bf16 ZeRO-1). Values the stage refuses (compile on at
    ZeRO-3, full recompute with dropout) get no row. Each row: {"option": label, sweep overrides...}."""
    from megagrow.parallel.engine import compile_on, ds_config, overlap_defaults

    st = plan.stages[k]
    rows = [{"option": "base"}]
    rows += [
        {"option": f"fused_qkv={str(not st.fused_qkv).lower()}", "fused_qkv": not st.fused_qkv},
        {"option": f"chunked_loss={str(not st.chunked_loss).lower()}", "chunked_loss": not st.chunked_loss},
    ]
    comp = "off" if compile_on(st) else "on"
    if not (comp == "on" and st.layout.zero_stage == 3):
        rows.append({"option": f"compile={comp}", "compile": comp})
    for mode in RECOMPUTE:
        if mode != st.activation_checkpointing and not (mode == "full" and st.model.dropout > 0):
            rows.append({"option": f"recompute={mode}", "activation_checkpointing": mode})
    if st.layout.dp > 1 and overlap_defaults(st):
        on = bool(ds_config(st)["zero_optimization"].get("overlap_comm", False))
        rows.append({"option": f"overlap={str(not on).lower()}", "overlap": not on})
    return rows


# --------------------------------------------------------------------------------------
# output


SHOWN = (
    ("option", "option"),
    ("ds_config", "ds_config"),
    ("activation_checkpointing", "ckpt"),
    ("fused_qkv", "fused"),
    ("compiled", "compiled"),
    ("chunked_loss", "chunked"),
    ("overlap", "overlap"),
)


def _shown(rows: list[dict]) -> list[tuple[str, str]]:
    """The row-identity columns worth a column: those that differ between rows, or that some row sets
    (ds_config, recompute other than none)."""
    out = []
    for k, lbl in SHOWN:
        vals = [r.get(k) for r in rows]
        if len({json.dumps(v) for v in vals}) > 1 or (
            k in ("ds_config", "activation_checkpointing") and any(v not in (None, False, "none") for v in vals)
        ):
            out.append((k, lbl))
    return out


def _cell(k: str, v) -> str:
    if k == "ds_config":
        return os.path.basename(str(v))
    if isinstance(v, bool):
        return "on" if v else "off"
    return "-" if v is None else str(v)


def format_table(res: dict) -> str:
    rows = res["rows"]
    lines = [
        f"megagrow bench {res['plan']} stage {res['stage']} on {res['device']} x{res['world_size']} "
        f"({'synthetic' if res['synthetic'] else 'real'} tokens)",
        f"FLOPs/token: {CONVENTION}; 'megatron' columns: Megatron-LM's formula (adds the logit GEMM)",
    ]
    extra = _shown(rows)
    vs = any(r.get("time_vs_base") is not None for r in rows)
    head = (
        [lbl for _, lbl in extra]
        + ["tp", "dp", "zero", "mb", "ga", "dtype", "step ms (p10-p90)"]
        + (["x base", "cpu x base"] if vs else [])
        + ["tok/s", "tok/s/dev", "TFLOP/s/dev", "megatron", "MFU", "peak GB", "plain ms", "ratio", "cpu-time ratio"]
    )
    table = [head]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        base = [_cell(k, r.get(k)) for k, _ in extra]
        base += [str(r["tp"]), str(r["dp"]), str(r["zero_stage"]), str(r["micro_batch"]), str(r["grad_accum"]), r["dtype"]]
        if r["oom"]:
            table.append(base + ["OOM"] + [""] * (len(head) - len(base) - 1))
            continue
        table.append(
            base
            + [f"{r['step_time_s'] * 1e3:.1f} ({r['step_time_p10_s'] * 1e3:.0f}-{r['step_time_p90_s'] * 1e3:.0f})"]
            + ([f(r.get("time_vs_base"), ".3f"), f(r.get("cpu_time_vs_base"), ".3f")] if vs else [])
            + [
                f"{r['tokens_per_s']:.0f}",
                f"{r['tokens_per_s_per_device']:.0f}",
                f(r["tflops_per_device"], ".4g"),
                f(r["tflops_per_device_megatron"], ".4g"),
                "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                f(r["peak_mem_gb"], ".2f"),
                "-" if r["baseline_step_time_s"] is None else f"{r['baseline_step_time_s'] * 1e3:.1f}",
                f(r["ratio"], ".3f"),
                f(r["cpu_time_ratio"], ".3f"),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    if vs:
        lines.append(
            "x base: the row's median step time / the base row's (the stage as configured), < 1 is faster; "
            "cpu x base: the same for the process CPU time a step (steadier on a busy machine)"
        )
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
        lines.append(f"transition {tr['from']} -> {tr['to']} ({tr['grow']}): {tr['transition_total_s']:.2f} s [{ph(tr['transition_s'])}]")
        lines.append(
            f"same-layout save + resume of {tr['to']}: {tr['resume_total_s']:.2f} s [{ph(tr['resume_s'])}]; ratio {tr['ratio']:.2f}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    """The `megagrow bench` command line."""
    p = argparse.ArgumentParser(prog="megagrow bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", help="stage plan YAML")
    p.add_argument("--stage", default="0", help="stage index or name (default 0)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row and loop (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--block", type=int, default=5, help="steps per block when alternating with the plain loop (default 5)")
    p.add_argument("--data", help="override the plan's dataset prefix")
    p.add_argument("--synthetic", action="store_true", help="random tokens instead of the dataset")
    p.add_argument(
        "--sweep", action="append", default=[], metavar="KEY=V1,V2", help=f"one row per value (repeatable, a grid): {', '.join(SWEEP_KEYS)}"
    )
    p.add_argument(
        "--options",
        action="store_true",
        help="one row per MFU option on/off beside the stage as it is (fused_qkv, compile, chunked_loss, "
        "recompute modes, overlap at dp > 1); not with --sweep",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the plain PyTorch loop")
    p.add_argument("--phases", action="store_true", help="also time data / forward / backward / step per step (syncs inside the step)")
    p.add_argument("--transition", action="store_true", help="also time the transition into --stage (see above)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s of one device for MFU (default: from the device table)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="also write the JSON to this file")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override one plan value (repeatable), as `megagrow train --set` does"
    )
    return p


def _checked_setup(args: argparse.Namespace) -> tuple[Plan, int, list[dict], list[Plan], int, int]:
    """The argument checks, all before any engine is built: step counts, the plan (with --set and
    --data), the stage, every row's plan and the dataset (unless --synthetic). Returns (plan, stage
    index, grid of row overrides, their plans, rank, world size)."""
    for name in ("steps", "block"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    if args.warmup < 0:
        raise UserError("--warmup must be >= 0")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UserError("--peak-tflops must be positive")
    plan = load_plan(args.plan, args.set or ())
    if args.data:
        plan = dataclasses.replace(plan, data=plan.data.replace(prefix=args.data))
    k = plan.stages.index(plan.stage(args.stage))
    if args.options and args.sweep:
        raise UserError("--options and --sweep: give one of them (--options varies one option at a time)")
    grid = option_rows(plan, k) if args.options else parse_sweeps(args.sweep)
    from megagrow.parallel.groups import _env_rank

    rank, world, _ = _env_rank()
    plans = [row_plan(plan, k, {o: v for o, v in over.items() if o != "option"}, world) for over in grid]  # all checked first
    if not args.synthetic:
        from megagrow.data.batches import Batches

        Batches.open(plan, plan.stages[k], 0, 1)  # a missing dataset is an error before any engine
    return plan, k, grid, plans, rank, world


def _bench_rows(args: argparse.Namespace, k: int, grid: list[dict], plans: list[Plan], rank: int) -> list[dict]:
    """The work: one bench_row per row plan (an --options row keeps its option's name), and with
    --options each row's step time and CPU time over the base (first) row's."""
    rows = []
    from tqdm import tqdm

    for over, p_row in tqdm(list(zip(grid, plans)), desc="bench", disable=rank != 0 or len(plans) == 1 or args.json, file=sys.stderr):
        row = bench_row(
            p_row,
            k,
            args.steps,
            args.warmup,
            args.block,
            args.synthetic,
            not args.no_baseline,
            args.peak_tflops,
            args.phases,
            overlap=over.get("overlap"),
        )
        rows.append({"option": over["option"], **row} if "option" in over else row)
    if args.options and not rows[0]["oom"]:
        for r in rows:
            r["time_vs_base"] = None if r["oom"] else r["step_time_s"] / rows[0]["step_time_s"]
            r["cpu_time_vs_base"] = None if r["oom"] else r["step_cpu_time_s"] / rows[0]["step_cpu_time_s"]
    return rows


def _report(args: argparse.Namespace, res: dict, rank: int) -> None:
    """The report, rank 0 only: the JSON to --out (atomically), and the JSON or the table on stdout."""
    if rank == 0:
        if args.out:
            from megagrow.fsutil import write_json_atomic

            write_json_atomic(args.out, res)
        print(json.dumps(res) if args.json else format_table(res), flush=True)


@cli_entry
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    plan, k, grid, plans, rank, world = _checked_setup(args)
    rows = _bench_rows(args, k, grid, plans, rank)
    dev = next((r["device"] for r in rows if "device" in r), "?")
    res = {
        "plan": plan.name,
        "stage": plan.stages[k].name,
        "device": dev,
        "world_size": world,
        "synthetic": args.synthetic,
        "convention": CONVENTION,
        "rows": rows,
    }
    if args.transition:
        res["transition"] = bench_transition(plan, k, args.synthetic)
    _report(args, res, rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
