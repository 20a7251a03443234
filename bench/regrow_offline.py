"""Regrow (tools/regrow.py, 2 CPU ranks) against `cp -r` of the bytes it writes.

    .venv/bin/python bench/regrow_offline.py [--workdir W] [--base TREE] [--size 0.25|1.3|5] [--only reshard|depth]
        [--repeat N] [--launch torchrun direct] [--settle S] [--no-import-time]

Trains a GPT-2 source (DP=2 ZeRO-2, fp32, 1 step; a ~0.25, 1.3 or 5.1 GB checkpoint by --size) once, then
regrows it into (1) the same model at TP=2 ZeRO-1 (a pure reshard) and (2) depth x2 at DP=2
ZeRO-1. For each: the regrow's wall time with the source cold (page cache dropped) and warm, its
peak RSS per rank and, where the tree reports it, the RSS growth above what a rank held when it
began its part, and `cp -r` of its output, cold (page cache dropped before) and warm (the output
just read once); each timed up to a `sync` after it. --launch: under torchrun (one interpreter
per rank), started directly (`python tools/regrow.py`: it forks its ranks), or both. --settle:
seconds to wait after each drop of the page cache, for regrow and cp alike. --base: another
megagrow checkout (e.g. `git archive HEAD`) whose tools/regrow.py is timed on the same source and
targets. Import time: one more run per tree with PYTHONPROFILEIMPORTTIME=1, rank 0's top-level
imports summed. Dropping the page cache needs root (`/proc/sys/vm/drop_caches`); without it
"cold" is reported as null. Prints one JSON object per (target, tree, launch), then a summary line.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "0.25": "n_layers: {L}, d_model: 384, n_heads: 6",
    "1.3": "n_layers: {L}, d_model: 896, n_heads: 14",
    "5": "n_layers: {L}, d_model: 1792, n_heads: 14",  # 316M parameters: a 5.1 GB source; the depth target writes 10 GB
}
PLAN = """name: regrow_bench
data: {{prefix: {data}}}
defaults: {{steps: 1, save_every: 1, log_every: 1}}
stages:
  - name: a
    model: {{flavour: gpt2, {m1}, vocab_size: 4096, seq_len: 64}}
    layout: {{tp: 1, dp: 2, zero_stage: 2, micro_batch: 1}}
  - name: {name}
    model: {{flavour: gpt2, {m2}, vocab_size: 4096, seq_len: 64}}
    layout: {layout}
{grow}"""


def env(tree: str, **extra) -> dict:
    e = dict(os.environ, PYTHONPATH=tree, DS_ACCELERATOR="cpu", DS_BUILD_OPS="0", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    e.update(extra)
    return e


def torchrun(tree: str, args: list, log_dir: str | None = None, **extra) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=0",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=127.0.0.1:0",
    ]
    if log_dir:
        cmd += ["--log-dir", log_dir, "--redirects", "2"]
    return subprocess.run(cmd + args, cwd=tree, env=env(tree, **extra), capture_output=True, text=True)


SETTLE = [0.0]  # seconds waited after dropping the page cache (--settle)


def drop_caches() -> bool:
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    time.sleep(SETTLE[0])
    return True


def timed(fn) -> float:
    subprocess.run(["sync"])
    t0 = time.perf_counter()
    fn()
    subprocess.run(["sync"])
    return time.perf_counter() - t0


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(d) for f in fs)


def regrow(tree: str, src: str, plan: str, stage: str, out: str, cold: bool, launch: str = "torchrun") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    dropped = drop_caches() if cold else None
    holder = {}
    args = [os.path.join(tree, "tools", "regrow.py"), "--src", src, "--plan", plan, "--to-stage", stage, "--out", out, "--json"]

    def go():
        if launch == "torchrun":
            holder["r"] = torchrun(tree, args)
        else:  # started directly: it forks (older trees: spawns) the ranks itself
            holder["r"] = subprocess.run([sys.executable, *args], cwd=tree, env=env(tree), capture_output=True, text=True)

    wall = timed(go)
    r = holder["r"]
    if r.returncode != 0:
        raise SystemExit(f"error: regrow in {tree} failed:\n{r.stderr[-3000:]}")
    s = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][0])
    if cold and not dropped:
        wall = None
    return {"wall_s": None if wall is None else round(wall, 2), "inside_s": round(s["seconds"], 2), "summary": s}


def cp_times(out: str) -> dict:
    copy = out + ".cp"
    shutil.rmtree(copy, ignore_errors=True)
    cold = drop_caches()
    c = timed(lambda: subprocess.run(["cp", "-r", out, copy], check=True))
    shutil.rmtree(copy)
    subprocess.run(["cat"] + [os.path.join(p, f) for p, _, fs in os.walk(out) for f in fs], stdout=subprocess.DEVNULL)
    w = timed(lambda: subprocess.run(["cp", "-r", out, copy], check=True))
    shutil.rmtree(copy)
    return {"cp_cold_s": round(c, 2) if cold else None, "cp_warm_s": round(w, 2)}


def import_seconds(tree: str, src: str, plan: str, stage: str, out: str, logs: str) -> dict:
    """Rank 0's import time in a regrow: the top-level entries of python's import profile, summed."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    r = torchrun(
        tree,
        [os.path.join(tree, "tools", "regrow.py"), "--src", src, "--plan", plan, "--to-stage", stage, "--out", out, "--json"],
        log_dir=logs,
        PYTHONPROFILEIMPORTTIME="1",
    )
    shutil.rmtree(out, ignore_errors=True)
    if r.returncode != 0:
        return {"error": r.stderr[-500:]}
    err = open(sorted(glob.glob(os.path.join(logs, "**", "0", "stderr.log"), recursive=True))[0]).read()
    top, mods = 0, {}
    for ln in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)", ln)
        if m and not m.group(3):
            top += int(m.group(2))
            mods[m.group(4)] = int(m.group(2))
    heavy = {k: round(v / 1e6, 2) for k, v in sorted(mods.items(), key=lambda kv: -kv[1])[:6]}
    return {"import_s": round(top / 1e6, 2), "megatron_imported": "megatron.core" in err, "heaviest": heavy}


def bound(summary: dict, model_line: str) -> dict:
    """RSS target of the issue per rank: its share written (its files) + 2 x the largest fp32 tensor."""
    d = int(re.search(r"d_model: (\d+)", model_line).group(1))
    largest = 4 * max(4096 * d, 4 * d * d)
    out = summary["out"]
    tag = summary["tag"]
    files = {os.path.basename(f): os.path.getsize(f) for f in glob.glob(os.path.join(out, tag, "*.pt"))}
    tp, dp = summary["layout"]["tp"], summary["layout"]["dp"]
    share = []
    for r in range(tp * dp):
        t, dr = r % tp, r // tp
        mine = [n for n in files if f"zero_pp_rank_{dr}_mp_rank_{t:02d}_" in n or (dr == 0 and n == f"mp_rank_{t:02d}_model_states.pt")]
        share.append(sum(files[n] for n in mine))
    lim = [s + 2 * largest for s in share]
    rss = summary["peak_rss_bytes_per_rank"]
    out = {
        "share_bytes_per_rank": share,
        "largest_tensor_bytes": largest,
        "rss_bound_bytes_per_rank": lim,
        "rss_over_bound": [round(a / b, 2) for a, b in zip(rss, lim)],
    }
    if "rss_growth_bytes_per_rank" in summary:  # trees that report the RSS a rank began its part with
        out["rss_growth_bytes_per_rank"] = summary["rss_growth_bytes_per_rank"]
        out["rss_growth_over_bound"] = [round(a / b, 2) for a, b in zip(summary["rss_growth_bytes_per_rank"], lim)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/megagrow-regrow-bench")
    ap.add_argument("--base", help="another checkout whose tools/regrow.py is timed too")
    ap.add_argument("--size", default="1.3", choices=sorted(MODELS))
    ap.add_argument("--data", default=os.path.join(HERE, "data_cache", "stdlib"))
    ap.add_argument("--no-import-time", action="store_true")
    ap.add_argument("--only", choices=["reshard", "depth"], help="run one of the two targets")
    ap.add_argument("--repeat", type=int, default=1, help="time each (target, tree) this many times, trees interleaved")
    ap.add_argument(
        "--launch",
        nargs="+",
        default=["torchrun"],
        choices=["torchrun", "direct"],
        help="how the regrow is started: torchrun (one interpreter per rank) and/or direct (python tools/regrow.py)",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds to wait after dropping the page cache before a cold timing (regrow and cp alike): on a VM "
        "that hands freed guest pages back to its host, memory first touched seconds after the drop costs far more",
    )
    args = ap.parse_args()
    SETTLE[0] = args.settle
    if not os.path.exists(args.data + ".idx"):
        print(f"error: dataset {args.data} not found (make demo prepares data_cache/stdlib)", file=sys.stderr)
        return 2
    W = args.workdir
    os.makedirs(W, exist_ok=True)
    m = MODELS[args.size]
    targets = {
        "reshard DP=2 -> TP=2": ("b", m.format(L=8), m.format(L=8), "{tp: 2, dp: 1, zero_stage: 1, micro_batch: 1}", ""),
        "depth x2, DP=2 ZeRO-1": ("c", m.format(L=8), m.format(L=16), "{tp: 1, dp: 2, zero_stage: 1, micro_batch: 1}", "    grow: depth\n"),
    }
    plans = {}
    for key, (name, m1, m2, lay, grow) in targets.items():
        p = os.path.join(W, f"plan_{name}.yaml")
        with open(p, "w") as f:
            f.write(PLAN.format(data=args.data, m1=m1, m2=m2, name=name, layout=lay, grow=grow))
        plans[key] = (p, name, m2)
    src = os.path.join(W, "run", "a", "checkpoints")
    if not os.path.isdir(src):
        # trained by the oldest tree: a newer megagrow reads an older record, not always the reverse
        r = torchrun(
            os.path.abspath(args.base) if args.base else HERE,
            ["-m", "megagrow.cli", "train", plans["reshard DP=2 -> TP=2"][0], "--stage", "a", "--run-dir", os.path.join(W, "run")],
        )
        if r.returncode != 0:
            print(f"error: training the source failed:\n{r.stderr[-3000:]}", file=sys.stderr)
            return 1
    src_bytes = sum(os.path.getsize(f) for f in glob.glob(os.path.join(src, "*", "*.pt")))
    trees = [HERE] + ([os.path.abspath(args.base)] if args.base else [])
    results = []
    for key, (plan, stage, m2) in plans.items():
        if args.only and not key.startswith(args.only):
            continue
        for tree, launch in [(t, la) for t in trees for la in args.launch] * args.repeat:
            out = os.path.join(W, f"out_{stage}")
            cold = regrow(tree, src, plan, stage, out, cold=True, launch=launch)
            warm = regrow(tree, src, plan, stage, out, cold=False, launch=launch)
            s = warm["summary"]
            row = {
                "target": key,
                "tree": tree,
                "launch": launch,
                "settle_s": args.settle,
                "source_bytes": src_bytes,
                "bytes_written": dir_bytes(out),
                "regrow_cold_s": cold["wall_s"],
                "regrow_warm_s": warm["wall_s"],
                "regrow_inside_warm_s": warm["inside_s"],
                **cp_times(out),
                "peak_rss_bytes_per_rank": s["peak_rss_bytes_per_rank"],
                "state_bytes_per_rank": s["state_bytes_per_rank"],
                "bytes_read_per_rank": s["bytes_read_per_rank"],
                "phase_seconds_rank0": s["phase_seconds_rank0"],
                **bound(s, m2),
            }
            if row["cp_cold_s"] and row["regrow_cold_s"]:
                row["cold_ratio"] = round(row["regrow_cold_s"] / row["cp_cold_s"], 2)
            row["warm_ratio"] = round(row["regrow_warm_s"] / row["cp_warm_s"], 2)
            if not args.no_import_time and key.startswith("reshard") and tree not in [r["tree"] for r in results]:
                row.update(import_seconds(tree, src, plan, stage, out, os.path.join(W, "logs")))
            shutil.rmtree(out, ignore_errors=True)
            print(json.dumps(row), flush=True)
            results.append(row)
    print(
        json.dumps(
            {
                "summary": [
                    {
                        k: r.get(k)
                        for k in (
                            "target",
                            "tree",
                            "launch",
                            "regrow_cold_s",
                            "cp_cold_s",
                            "cold_ratio",
                            "regrow_warm_s",
                            "cp_warm_s",
                            "warm_ratio",
                            "rss_over_bound",
                            "rss_growth_over_bound",
                            "import_s",
                        )
                    }
                    for r in results
                ]
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
