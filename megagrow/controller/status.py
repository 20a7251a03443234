"""`megagrow status RUN`: a table (or --json) of every stage's state, derived from its sealed
checkpoints (controller.progress); RUN/manifest.json adds what runs now. Every disagreement
between the records is a named state and one `note:` line."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

from megagrow.config import Plan
from megagrow.controller.progress import read_manifest, read_progress
from megagrow.errors import EXIT_OK, UserError
from megagrow.fsutil import FsClock, observed_age
from megagrow.paths import MANIFEST, RunPaths


def _fmt_tokens(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def status_dict(run_dir: str) -> dict:
    m = read_manifest(run_dir)
    if not m:
        raise UserError(f"{run_dir}: no {MANIFEST} (not a run directory of `megagrow run`)")
    plan = Plan.from_dict(m["plan"], "manifest.plan")
    progress = read_progress(plan, run_dir)
    cur = m.get("current") or {}
    stages = []
    for p in progress:
        s = asdict(p)
        s.pop("partial")
        if m.get("state") == "running" and cur.get("stage_index") == p.index:
            s["state"] = "growing" if cur.get("action") == "grow" and p.checkpoint is None else "running"
            # rank 0 rewrites it as steps finish; its age is the time since it last changed, as the hang
            # watchdog (or an earlier status) saw it, on the file system's clock: never rank 0's host's stamp
            hb = RunPaths(run_dir).stage(p.name).heartbeat
            age = observed_age(hb, FsClock(hb + ".status").now())
            s["progress_age_s"] = None if age is None else round(age, 1)
        elif m.get("state") == "failed" and cur.get("stage_index") == p.index:
            s["state"] = "failed"
        stages.append(s)
    total = sum(s["tokens"] for s in stages)
    notes = [f"{s['name']}: {s['state']}: {s['note']}" for s in stages if s.get("note")]
    state = m.get("state")
    if state == "done" and any(s["state"] != "done" for s in stages):  # the manifest's word against the checkpoints
        state = "torn" if any(s["state"] == "torn" for s in stages) else "incomplete"
        notes.insert(
            0,
            f"run: {state}: RUN/{MANIFEST} says done, but "
            + ", ".join(f"{s['name']} is {s['state']}" for s in stages if s["state"] != "done")
            + " (the checkpoints decide: `megagrow run` goes on from them)",
        )
    return {
        "run_dir": os.path.abspath(run_dir),
        "plan": plan.name,
        "plan_file": m.get("plan_file"),
        "state": state,
        "current": cur or None,
        "allocation": m.get("allocation"),
        "updated": m.get("updated"),
        "tokens": total,
        "stages": stages,
        "notes": notes,
        "events": m.get("events", [])[-5:],
    }


def status_main(args) -> int:
    d = status_dict(args.run_dir)
    if args.json:
        print(json.dumps(d, indent=1))
        return EXIT_OK
    a = d.get("allocation") or {}
    where = f"slurm job {a.get('job_id')} (restart {a.get('restart_count')})" if a.get("kind") == "slurm" else "local"
    age = time.time() - (d.get("updated") or time.time())
    beat = [s["progress_age_s"] for s in d["stages"] if s.get("progress_age_s") is not None]
    last = f", last step {beat[0]:.0f} s ago" if beat else ""
    print(f"run {d['run_dir']}  plan {d['plan']}  state {d['state']}  ({where}, manifest updated {age:.0f} s ago{last})")
    rows = [("STAGE", "STATE", "STEP", "TOKENS", "LOSS", "EVAL", "LAYOUT", "GROW", "CHECKPOINT")]
    for s in d["stages"]:
        L = s["layout"]
        rows.append(
            (
                s["name"],
                s["state"],
                f"{s['step']}/{s['steps']}",
                _fmt_tokens(s["tokens"]),
                "-" if s["loss"] is None else f"{s['loss']:.4f}",
                "-" if s.get("eval_loss") is None else f"{s['eval_loss']:.4f}",
                f"tp{L['tp']} dp{L['dp']} zero{L['zero_stage']} {L['dtype']}",
                s["grow"] or "-",
                s["checkpoint"] or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"tokens {_fmt_tokens(d['tokens'])}")
    for n in d["notes"]:
        print(f"note: {n}")
    return EXIT_OK
