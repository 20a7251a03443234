"""The savings report's numbers: every run's state and curves, the driver's choices (best LR,
headline run) and every table's values, as one dict (`build`); megagrow.results.render turns it
into docs/results/savings.md and savings.png.

Everything in the report is read from OUT (the experiment directory of tools/savings.py):
OUT/plans/<run>.yaml (the plan each run trained), OUT/runs/<run>/<stage>/log.jsonl and
status.json (what the trainer wrote), OUT/choices.json (the LR and headline choices the driver
made, themselves computed from logs). Nothing is typed in by hand.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from megagrow.results.experiment import ABLATIONS, KINDS, RunSpec, planner_split, runs
from megagrow.config import ModelConfig
from megagrow.fsutil import read_json
from megagrow.metrics.flops import flops_per_token, logit_flops_per_token
from megagrow.results.savings import Curve, Frontier, compare, oracle_switch, read_curve
from megagrow.schedule.slope import THRESHOLDS


# ----------------------------------------------------------------------------- run state
@dataclass
class RunState:
    spec: RunSpec
    dir: str = ""  # OUT/runs/<name>
    plan: Optional[dict] = None  # the plan it trains (OUT/plans/<name>.yaml), None before it is built
    stages: list = field(default_factory=list)  # status.json of each stage (None where absent)
    curve: Optional[Curve] = None  # FLOPs on the trainer's ledger
    curve_total: Optional[Curve] = None  # the same points, FLOPs with the logit GEMM added

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def done(self) -> bool:
        return bool(self.stages) and all(s is not None and s.get("state") == "done" for s in self.stages)

    @property
    def started(self) -> bool:
        return any(s is not None for s in self.stages)


def plan_path(out: str, name: str) -> str:
    return os.path.join(out, "plans", f"{name}.yaml")


def run_dir(out: str, name: str) -> str:
    return os.path.join(out, "runs", name)


def load_state(out: str, spec: RunSpec) -> RunState:
    import yaml

    st = RunState(spec, run_dir(out, spec.name))
    p = plan_path(out, spec.name)
    if os.path.isfile(p):
        with open(p) as f:
            st.plan = yaml.safe_load(f)
        names = [s["name"] for s in st.plan["stages"]]
        st.stages = [read_json(os.path.join(run_dir(out, spec.name), n, "status.json")) for n in names]
        if st.started:
            st.curve = read_curve(run_dir(out, spec.name), names, spec.name)
            logits = [float(logit_flops_per_token(ModelConfig.from_dict(s["model"]))) for s in st.plan["stages"]]
            st.curve_total = read_curve(run_dir(out, spec.name), names, spec.name, extra_per_token=logits)
    return st


def load_all(out: str, spec: dict, data: str) -> dict:
    return {r.name: load_state(out, r) for r in runs(spec, data)}


# ----------------------------------------------------------------------------- choices from logs
def best_lr(states: dict) -> Optional[tuple[float, str]]:
    """(LR, run) of the sweep run with the lowest final validation loss, once every sweep run is done."""
    sweep = [s for s in states.values() if s.spec.kind == "sweep"]
    if not sweep or not all(s.done and s.curve and s.curve.final_loss is not None for s in sweep):
        return None
    best = min(sweep, key=lambda s: s.curve.final_loss)
    return float(best.spec.info["lr"]), best.name


def frontier(states: dict, seed_kinds=("sweep", "baseline"), total: bool = False) -> Frontier:
    """The baseline curve of these kinds of run; `total`: on FLOPs with the logit GEMM added."""
    pts = [((s.curve_total if total else s.curve).flops, s.curve.final_loss) for s in states.values()
           if s.spec.kind in seed_kinds and s.done and s.curve and s.curve.final_loss is not None]
    return Frontier.of(pts)


def headline(states: dict) -> Optional[str]:
    """The best staged run (staged-* or slope-*): highest saving vs the baseline curve; where no
    saving can be read off, the lowest loss difference at equal FLOPs. None until every staged,
    slope and baseline run is done."""
    need = [s for s in states.values() if s.spec.kind in ("sweep", "baseline", "staged", "slope")]
    if not all(s.done for s in need):
        return None
    f = frontier(states)
    rows = [(s.name, compare(s.name, s.spec.kind, s.curve.flops, s.curve.final_loss, f))
            for s in need if s.spec.kind in ("staged", "slope")]
    with_saving = [(r.saving, n) for n, r in rows if r.saving is not None]
    if with_saving:
        return max(with_saving)[1]
    with_delta = [(r.delta_loss, n) for n, r in rows if r.delta_loss is not None]
    if with_delta:
        return min(with_delta)[1]
    return min(rows, key=lambda nr: nr[1].final_loss)[0]


# ----------------------------------------------------------------------------- helpers
def shape_label(m: dict) -> str:
    return f"{m['n_layers']}x{m['d_model']}"


def _wall(out: str, st: RunState) -> Optional[float]:
    """Wall seconds of the run: from the driver's OUT/timing/<run>.json (start-up, growth and
    evals included), else the span of each stage's log records, summed. The machine is shared:
    indicative only."""
    t = read_json(os.path.join(out, "timing", f"{st.name}.json"))
    if t and t.get("seconds"):
        return float(t["seconds"])
    if not st.plan:
        return None
    total = 0.0
    for s in st.plan["stages"]:
        times = []
        p = os.path.join(run_dir(out, st.name), s["name"], "log.jsonl")
        if os.path.isfile(p):
            with open(p) as f:
                for line in f:
                    try:
                        t = json.loads(line).get("time")
                    except ValueError:
                        continue
                    if t is not None:
                        times.append(float(t))
        if times:
            total += max(times) - min(times)
    return total or None


def transitions(st: RunState) -> list[dict]:
    """Each growth of a run: the eval loss right before and right after it (the grown stage's
    log holds both, at its step 0: "before_growth" is the source's final eval, "after_growth"
    the grown model's), and where it happened."""
    out = []
    if not st.plan or not st.curve:
        return out
    stage_names = [s["name"] for s in st.plan["stages"]]
    for k in range(1, len(stage_names)):
        prev, cur = stage_names[k - 1], stage_names[k]
        found = {}
        for r in _records(os.path.join(st.dir, cur, "log.jsonl")):
            if r.get("at") in ("before_growth", "after_growth") and "eval_loss" in r and r.get("step") == 0:
                found.setdefault(r["at"], r)
        status = st.stages[k - 1] or {}
        before, after = found.get("before_growth"), found.get("after_growth")
        out.append({"from": prev, "to": cur, "step": status.get("step"), "stopped_by": status.get("stopped_by"),
                    "flops": (before or after or {}).get("flops", dict(st.curve.stage_ends).get(prev)),
                    "before": before["eval_loss"] if before else None, "after": after["eval_loss"] if after else None})
    return out


def _records(path: str) -> list[dict]:
    from megagrow.results.savings import _records as rec

    return rec(path)


# ----------------------------------------------------------------------------- the report
def build(out: str, spec: dict, spec_path: str, data: str) -> dict:
    """All numbers of the report, as one dict (the markdown and the --json output)."""
    states = load_all(out, spec, data)
    choices = read_json(os.path.join(out, "choices.json")) or {}
    f1 = frontier(states)
    f2 = frontier(states, ("seed2-baseline",))
    f1t, f2t = frontier(states, total=True), frontier(states, ("seed2-baseline",), total=True)
    rows = []
    for st in states.values():
        c, ct = st.curve, st.curve_total
        seed2 = st.spec.kind.startswith("seed2")
        r = compare(st.name, st.spec.kind, c.flops if c else None, c.final_loss if c else None, f2 if seed2 else f1)
        rt = compare(st.name, st.spec.kind, ct.flops if ct else None, ct.final_loss if ct else None, f2t if seed2 else f1t)
        stages = []
        if st.plan:
            for s, status in zip(st.plan["stages"], st.stages):
                stages.append({"name": s["name"], "shape": shape_label(s["model"]), "steps": s["steps"],
                               "ran": (status or {}).get("step"), "state": (status or {}).get("state", "pending"),
                               "stopped_by": (status or {}).get("stopped_by")})
        rows.append({"row": r.to_dict(), "row_total": rt.to_dict(), "kind": st.spec.kind, "done": st.done, "started": st.started,
                     "stages": stages, "seed": st.plan["seed"] if st.plan else st.spec.info.get("seed"),
                     "lr": st.plan["defaults"]["optim"]["lr"] if st.plan else None,
                     "wall_s": _wall(out, st), "tokens": c.tokens if c else None,
                     "transitions": transitions(st) if st.done else []})
    result = {"spec": spec_path, "out": out, "data": data, "choices": choices, "rows": rows,
              "frontier": [list(p) for p in f1.points], "frontier_seed2": [list(p) for p in f2.points],
              "frontier_total": [list(p) for p in f1t.points],
              "complete": [r["row"]["name"] for r in rows if r["done"]],
              "incomplete": [r["row"]["name"] for r in rows if not r["done"]],
              "splits": {k: planner_split(spec, k) for k in KINDS}}
    rd = os.path.join(out, "runs")
    result["not_in_spec"] = sorted(d for d in (os.listdir(rd) if os.path.isdir(rd) else []) if d not in states)
    result["slope"] = _slope_vs_oracle(states, spec)
    result["seeds"] = _seeds(states, choices, f1, f2, f1t, f2t)
    result["logit_share"] = _logit_share(states)
    result["ablations"] = _ablations(states, spec)
    return result


def _slope_vs_oracle(states: dict, spec: dict) -> list[dict]:
    """Where the slope rule grew each slope-* run vs the planned switch and the oracle switch
    (the best point in hindsight on the small model's measured curve, with the largest baseline
    run's curve as the big model's; target: that baseline's final loss)."""
    big = max((s for s in states.values() if s.spec.kind in ("baseline", "sweep") and s.done and s.curve),
              key=lambda s: (s.curve.flops or 0, -(s.curve.final_loss or 0)), default=None)
    out = []
    for k in KINDS:
        st, planned = states.get(f"slope-{k}"), states.get(f"staged-{k}")
        if not st or not st.plan:
            continue
        first = st.plan["stages"][0]["name"]
        status = st.stages[0] or {}
        nxt = st.plan["stages"][1].get("grow", "") if len(st.plan["stages"]) > 1 else ""
        row = {"run": st.name, "stage": first, "upper_steps": st.plan["stages"][0]["steps"],
               "threshold": THRESHOLDS.get(nxt.split(":")[0]),
               "ended_at": status.get("step"), "state": status.get("state"), "fired": status.get("stopped_by") == "slope",
               "planned_steps": planned.plan["stages"][0]["steps"] if planned and planned.plan else None,
               "oracle": None, "slope_at_end": None}
        c = st.curve
        if c:
            idx = [i for i, s in enumerate(c.eval_stage) if s == first]
            fl, lo = [c.eval_flops[i] for i in idx], [c.eval_loss[i] for i in idx]
            steps = [c.eval_step[i] for i in idx]
            if len(fl) >= 2:
                from megagrow.schedule.slope import smoothed_slopes

                sl = smoothed_slopes(fl, lo, window=min(int(spec["slope"]["window"]), len(fl)))
                row["slope_at_end"] = None if math.isnan(sl[-1]) else float(sl[-1])
            if big and len(fl) >= 2 and k != "both":
                o = oracle_switch(fl, lo, big.curve.eval_flops, big.curve.eval_loss, big.curve.final_loss)
                if o:
                    row["oracle"] = {"step": steps[o["index"]], "flops": o["flops"], "loss": o["loss"],
                                     "at_end": o["at_end"], "big": big.name}
        out.append(row)
    return out


def _seeds(states: dict, choices: dict, f1: Frontier, f2: Frontier, f1t: Frontier, f2t: Frontier) -> dict:
    best = choices.get("headline")
    out = {"headline": best, "staged": [], "baseline": []}
    if best and best in states:
        for name, fr_own, frt_own in ((best, f1, f1t), ("seed2-staged", f2, f2t)):
            st = states.get(name)
            if st and st.done and st.curve:
                c, ct = st.curve, st.curve_total
                out["staged"].append({"run": name, "seed": st.plan["seed"], "flops": c.flops, "final_loss": c.final_loss,
                                      "saving_own_seed": compare(name, "", c.flops, c.final_loss, fr_own).saving,
                                      "saving_seed1_curve": compare(name, "", c.flops, c.final_loss, f1).saving,
                                      "saving_total_own_seed": compare(name, "", ct.flops, ct.final_loss, frt_own).saving})
    for st in states.values():
        if st.spec.kind == "seed2-baseline" and st.done and st.curve:
            b = st.spec.info["budget"]
            twin = next((s for s in states.values() if s.spec.kind in ("baseline", "sweep") and s.done and s.curve
                         and s.spec.info.get("budget") == b and (s.spec.kind == "baseline" or s.name == choices.get("lr_run"))), None)
            out["baseline"].append({"budget": b, "seed2": st.curve.final_loss,
                                    "seed1": twin.curve.final_loss if twin else None, "seed1_run": twin.name if twin else None})
    return out


def _logit_share(states: dict) -> dict:
    """Per model shape in the experiment: the logit GEMM's share of all training FLOPs per token."""
    out = {}
    for st in states.values():
        for s in (st.plan or {}).get("stages", []):
            m = ModelConfig.from_dict(s["model"])
            lg = logit_flops_per_token(m)
            out[shape_label(s["model"])] = lg / (lg + flops_per_token(m))
    return out


def _ablations(states: dict, spec: dict) -> list[dict]:
    base = states.get(f"staged-{spec['ablation_base']}")
    out = []
    for key, (what, _) in ABLATIONS.items():
        st = states.get(f"abl-{spec['ablation_base']}-{key}")
        if not st:
            continue
        row = {"run": st.name, "knob": key, "what": what, "done": st.done,
               "final_loss": st.curve.final_loss if st.done and st.curve else None,
               "base_loss": base.curve.final_loss if base and base.done and base.curve else None}
        row["delta"] = None if row["final_loss"] is None or row["base_loss"] is None else row["final_loss"] - row["base_loss"]
        out.append(row)
    return out
