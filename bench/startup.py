#!/usr/bin/env python
"""Fixed cost of a stage process, measured on one or more source trees side by side.

For each tree (a checkout of this repository; its `megagrow` package is put first on
PYTHONPATH) and each repeat, it runs on this machine, one process per rank as the controller
starts them:
  1. stage 0 of PLAN from scratch, 1 step (`megagrow train PLAN --stage 0 --stop-at 1`);
  2. stage 1 of PLAN, 1 step: the transition from stage 0 at start-up, then the step.
and reports, per run: time to first step (launch -> the first log record's wall time), time
from the last save to the last rank's exit (status.json's time -> exit: shutdown), and the
whole wall time. Trees run interleaved (A B A B ...) so machine noise hits them alike;
the median over repeats is printed.

    python bench/startup.py --plan PLAN --trees /path/to/old /path/to/new [--repeat 3] [--json]

PLAN: two stages, stage 1 grown from stage 0, each with `steps` >= 1 and a dataset that
exists. Example: a 2-layer d=128 GPT-2 at DP=2 ZeRO-2 grown x2 in width at TP=2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagrow.errors import UserError, cli_entry  # noqa: E402


def _run_stage(tree: str, plan: str, stage: int, run_dir: str, world: int) -> dict:
    from megagrow.parallel.groups import free_port

    port = str(free_port())
    procs = []
    t0 = time.time()
    for r in range(world):
        env = dict(
            os.environ, PYTHONPATH=tree, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("PYTHONWARNINGS", "ignore")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "megagrow.cli", "train", plan, "--stage", str(stage), "--run-dir", run_dir, "--stop-at", "1"],
                env=env,
                cwd=tree,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errs = [p.communicate()[1] for p in procs]
    t_end = time.time()
    if any(p.returncode != 0 for p in procs):
        raise UserError(f"stage {stage} in {tree} failed: {errs[0].strip().splitlines()[-1:]}")
    from megagrow.config import load_plan

    name = load_plan(plan).stages[stage].name
    from megagrow.fsutil import read_records
    from megagrow.paths import RunPaths

    first = read_records(RunPaths(run_dir).stage(name).log)[0]["time"]
    with open(RunPaths(run_dir).stage(name).status) as f:
        saved = json.load(f)["time"]
    return {"first_step_s": first - t0, "shutdown_s": t_end - saved, "wall_s": t_end - t0}


@cli_entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="startup.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="a two-stage plan (stage 1 grown from stage 0)")
    p.add_argument("--trees", nargs="+", required=True, help="repository checkouts to compare")
    p.add_argument("--repeat", type=int, default=3, help="runs per tree (default 3)")
    p.add_argument("--json", action="store_true", help="JSON summary on stdout")
    args = p.parse_args(argv)
    from megagrow.config import load_plan

    plan = load_plan(args.plan)
    if len(plan.stages) < 2:
        raise UserError(f"{args.plan}: needs two stages (stage 1 grown from stage 0)")
    for t in args.trees:
        if not os.path.isfile(os.path.join(t, "megagrow", "cli.py")):
            raise UserError(f"{t}: not a megagrow checkout (no megagrow/cli.py)")
    from tqdm import tqdm

    raw = {t: {"stage0": [], "transition": []} for t in args.trees}
    work = tempfile.mkdtemp(prefix="megagrow-startup-")
    try:
        bar = tqdm(total=args.repeat * len(args.trees), desc="startup", unit="run", file=sys.stderr)
        for i in range(args.repeat):
            for t in args.trees:
                run = os.path.join(work, f"{i}-{args.trees.index(t)}")
                raw[t]["stage0"].append(_run_stage(t, args.plan, 0, run, plan.stages[0].layout.world_size))
                raw[t]["transition"].append(_run_stage(t, args.plan, 1, run, plan.stages[1].layout.world_size))
                shutil.rmtree(run, ignore_errors=True)
                bar.update()
        bar.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        t: {kind: {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]} for kind, runs in v.items()} for t, v in raw.items()
    }
    if args.json:
        print(json.dumps({"median": summary, "runs": raw}))
    else:
        for t, v in summary.items():
            for kind, m in v.items():
                print(f"{t} {kind}: first step {m['first_step_s']:.2f} s, shutdown {m['shutdown_s']:.2f} s, wall {m['wall_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
