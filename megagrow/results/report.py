"""The savings report: docs/results/savings.md and savings.png, generated from the runs' logs.

Everything in the report is read from OUT (the experiment directory of tools/savings.py):
OUT/plans/<run>.yaml (the plan each run trained), OUT/runs/<run>/<stage>/log.jsonl and
status.json (what the trainer wrote), OUT/choices.json (the LR and headline choices the driver
made, themselves computed from logs). Nothing is typed in by hand.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from megagrow.results.experiment import ABLATIONS, KINDS, RunSpec, chain, planner_split, runs, steps_for
from megagrow.config import ModelConfig
from megagrow.fsutil import read_json
from megagrow.metrics.flops import flops_per_token, logit_flops_per_token
from megagrow.results.savings import Curve, Frontier, Row, compare, oracle_switch, read_curve


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


# ----------------------------------------------------------------------------- formatting
def _e(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3e}"


def _f(x: Optional[float], nd: int = 4) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else ("0.0%" if abs(x) < 5e-4 else f"{100 * x:+.1f}%")


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _shape(m: dict) -> str:
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
                stages.append({"name": s["name"], "shape": _shape(s["model"]), "steps": s["steps"],
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
        from megagrow.schedule.slope import THRESHOLDS

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
            out[_shape(s["model"])] = lg / (lg + flops_per_token(m))
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


# ----------------------------------------------------------------------------- markdown
def markdown(res: dict, spec: dict, commands: list[str]) -> str:
    rows = res["rows"]
    ch = res["choices"]
    L = []
    L.append("# Savings: staged training vs from-scratch baselines at equal FLOPs")
    L.append("")
    L.append(f"Generated by `tools/savings.py report` from the run logs in `{os.path.basename(res['out'])}/` on "
             f"{datetime.datetime.utcnow().strftime('%Y-%m-%d %H:%M')} UTC. Do not edit by hand: rerun the report.")
    L.append("")
    L.append("Reproduce (from a fresh checkout; the default corpus is prepared by `make data`):")
    L.append("")
    L.append("```bash")
    L += commands
    L.append("```")
    L.append("")
    n_done, n_all = len(res["complete"]), len(rows)
    if res["incomplete"]:
        L.append(f"**Runs complete: {n_done} of {n_all}.** Not complete (left out of every number below, "
                 f"or shown as partial): {', '.join(res['incomplete'])}.")
    else:
        L.append(f"All {n_all} runs complete.")
    if res.get("not_in_spec"):
        L.append("")
        L.append(f"Run directories in `{os.path.basename(res['out'])}/runs` that the spec no longer lists (left out of everything "
                 f"below): {', '.join(res['not_in_spec'])}.")
    L.append("")
    # setup
    final = spec["final"]
    L.append("## Setup")
    L.append("")
    bt = spec["layout"].get("micro_batch", 4) * spec["model"]["seq_len"]
    L.append(f"- Final model: GPT-2 {final['n_layers']} layers x d_model {final['d_model']} "
             f"({final['n_heads']} heads), vocab {spec['model']['vocab_size']}, seq {spec['model']['seq_len']}; "
             f"batch {spec['layout'].get('micro_batch')} x {spec['model']['seq_len']} = {bt} tokens a step; "
             f"single process (ZeRO-{spec['layout'].get('zero_stage')}, fp32, CPU).")
    L.append(f"- Reference budget {spec['reference_tokens']:,} tokens ({steps_for(spec, 1.0)} steps). Baselines: the final "
             f"size from scratch at {', '.join(f'{b:g}' for b in spec['baseline_budgets'])} x that, cosine LR to "
             f"{spec['optim'].get('min_lr_ratio', 0.1):g} x peak at the end of each run's own budget, warmup "
             f"{spec['optim'].get('warmup_steps')} steps.")
    lr = ch.get("lr")
    sweep = [r for r in rows if r["kind"] == "sweep"]
    L.append(f"- Peak LR sweep at {spec['lr_sweep']['budget']:g} x reference: "
             + ", ".join(f"{r['lr']:g} -> {_f(r['row']['final_loss'])}" for r in sweep)
             + (f"; best {lr:g}, used for every run." if lr is not None else "; not finished."))
    for k, sp in res["splits"].items():
        shapes = " -> ".join(_shape(c["shape"]) for c in chain(spec, k))
        L.append(f"- Staged {k}: {shapes}; token split {' / '.join(f'{100 * x:.0f}%' for x in sp['fractions'])} from "
                 f"`{sp['command']}` (law's predicted saving {100 * sp['predicted_saving']:.1f}%), total "
                 f"{spec['staged_tokens']:g} x reference tokens; LR placement `paper`, no re-warmup (the defaults).")
    L.append(f"- Slope-rule runs: each growing stage ends when the rule fires (validation loss when the stage "
             f"evaluates; window {spec['slope']['window']} points, not before step {spec['slope']['min_steps']}, "
             f"at most {spec['slope']['upper']:g} x the planned steps); the last stage as planned.")
    L.append(f"- Validation loss: {spec['eval'].get('eval_tokens')} held-out tokens (the same fixed windows for every "
             f"run), every {spec['eval'].get('eval_every')} steps and at each stage end. FLOPs: the trainer's ledger, "
             "6 N_non-embedding + 12 L d s per token, every stage counted.")
    L.append("")
    # main table
    L.append("## Every run")
    L.append("")
    L.append("Saving = 1 - FLOPs / (baseline FLOPs to reach the run's final loss), read off the baseline curve "
             "(lower envelope of the fully-decayed baselines' final losses, linear in log FLOPs) by interpolation "
             "only; \"not reached\" where that would need extrapolation. Loss at equal FLOPs: the baseline curve at "
             "the run's FLOPs, and the run's final loss minus it (negative = better than the baseline). Second-seed "
             "runs are read against the second-seed baselines. \"Saving, logits counted\": the same reading with "
             "every run's FLOPs (baselines included) also counting the output logit GEMM, 6 x d_model x vocab per "
             "token, which the ledger leaves out (see Notes).")
    L.append("")
    hdr = ["run", "kind", "stages (steps run)", "FLOPs", "final val loss", "baseline FLOPs to reach it", "saving",
           "baseline loss at equal FLOPs", "delta loss", "saving, logits counted", "wall s"]
    body = []
    for r in rows:
        x = r["row"]
        st = " -> ".join(f"{s['shape']} ({s['ran'] if s['ran'] is not None else 0}/{s['steps']}"
                         f"{', slope' if s['stopped_by'] == 'slope' else ''})" for s in r["stages"]) or "-"
        if not r["done"]:
            st += " **incomplete**" if r["started"] else " **not run**"
        need = _e(x["baseline_flops_to_loss"]) if x["baseline_flops_to_loss"] is not None else (
            "not reached" if x["final_loss"] is not None else "-")
        body.append([x["name"], x["kind"], st, _e(x["flops"]) if r["done"] else "-", _f(x["final_loss"]) if r["done"] else "-",
                     need if r["done"] else "-", _pct(x["saving"]) if r["done"] else "-",
                     _f(x["baseline_loss_at_flops"]) if r["done"] else "-", _f(x["delta_loss"], 4) if r["done"] else "-",
                     _pct(r["row_total"]["saving"]) if r["done"] else "-", f"{r['wall_s']:.0f}" if r["wall_s"] else "-"])
    L.append(_table(hdr, body))
    L.append("")
    L.append("Baseline curve (FLOPs, final val loss): " + ", ".join(f"({c:.3e}, {l:.4f})" for c, l in res["frontier"]))
    L.append("")
    # findings
    L.append("## What was found")
    L.append("")
    staged = [r for r in rows if r["kind"] in ("staged", "slope") and r["done"]]
    with_s = [r for r in staged if r["row"]["saving"] is not None]
    if with_s:
        best = max(with_s, key=lambda r: r["row"]["saving"])
        tot = best["row_total"]["saving"]
        L.append(f"- Best staged run: `{best['row']['name']}`, saving {100 * best['row']['saving']:+.2f}% of the baseline's "
                 f"ledger FLOPs for the same final validation loss ({_f(best['row']['final_loss'])}); "
                 f"{_pct(tot)} with the logit GEMM counted. Goal >= 20% (this seed): "
                 f"{'reached' if best['row']['saving'] >= 0.2 else 'not reached'} on the ledger, "
                 f"{'reached' if tot is not None and tot >= 0.2 else 'not reached'} with the logits counted.")
        for r in sorted(with_s, key=lambda r: -r["row"]["saving"]):
            if r is not best:
                L.append(f"- `{r['row']['name']}`: {_pct(r['row']['saving'])} ({_pct(r['row_total']['saving'])} "
                         "with the logits counted).")
    elif staged:
        L.append("- No staged run's final loss falls inside the baseline curve's range: no saving can be read off "
                 "without extrapolation (see the delta-loss column).")
    else:
        L.append("- No staged run finished yet.")
    nr = [r for r in staged if r["row"]["saving"] is None and r["row"]["final_loss"] is not None]
    for r in nr:
        L.append(f"- `{r['row']['name']}`: baseline FLOPs to reach its loss: not reached (delta at equal FLOPs "
                 f"{_f(r['row']['delta_loss'])}).")
    tr = [(r["row"]["name"], t) for r in staged for t in r["transitions"] if t["before"] is not None and t["after"] is not None]
    if tr:
        L.append("- Validation loss right before -> right after each growth (an exact operator keeps it): "
                 + "; ".join(f"{n} {t['from']}->{t['to']}: {t['before']:.4f} -> {t['after']:.4f}" for n, t in tr) + ".")
    L.append("")
    # seeds
    L.append("## Seeds (the headline pair)")
    L.append("")
    s = res["seeds"]
    if s["headline"]:
        L.append(f"Headline staged run (highest saving among staged-* and slope-*, chosen from the logs): "
                 f"`{s['headline']}`, rerun with seed {spec['seeds'][1]} as `seed2-staged`.")
        L.append("")
        if s["staged"]:
            L.append(_table(["run", "seed", "FLOPs", "final val loss", "saving vs own seed's baselines",
                             "saving vs seed-1 baselines", "saving vs own seed's, logits counted"],
                            [[x["run"], str(x["seed"]), _e(x["flops"]), _f(x["final_loss"]), _pct(x["saving_own_seed"]),
                              _pct(x["saving_seed1_curve"]), _pct(x.get("saving_total_own_seed"))] for x in s["staged"]]))
            L.append("")
        vals = [x["final_loss"] for x in s["staged"] if x["final_loss"] is not None]
        if len(vals) >= 2:
            L.append(f"Staged final loss spread over seeds: {max(vals) - min(vals):.4f} (max - min).")
            for key, what in (("saving_own_seed", "on the ledger"), ("saving_total_own_seed", "with the logits counted")):
                sv = [x.get(key) for x in s["staged"]]
                if all(v is not None for v in sv):
                    L.append(f"Saving of the headline run {what}, each seed against its own baselines: mean "
                             f"{100 * sum(sv) / len(sv):+.1f}%, range {100 * min(sv):+.1f}% .. {100 * max(sv):+.1f}% "
                             f"over {len(sv)} seeds.")
            L.append("")
    else:
        L.append("Headline staged run: not chosen yet (it is chosen once every baseline, staged and slope run is "
                 "done), so its second-seed run has not run.")
        L.append("")
    if s["baseline"]:
        L.append("Baselines with both seeds:")
        L.append("")
        L.append(_table(["baseline budget", "seed 1 final loss", f"seed {spec['seeds'][1]} final loss", "difference"],
                        [[f"{x['budget']:g}", _f(x["seed1"]), _f(x["seed2"]),
                          _f(None if x["seed1"] is None else x["seed2"] - x["seed1"])] for x in s["baseline"]]))
    L.append("")
    # ablations
    L.append(f"## Ablations (on `staged-{spec['ablation_base']}`, same FLOPs)")
    L.append("")
    ab = res["ablations"]
    if ab:
        L.append(_table(["run", "change", "final val loss", f"vs staged-{spec['ablation_base']}"],
                        [[a["run"], a["what"], _f(a["final_loss"]) if a["done"] else "not run / incomplete",
                          _f(a["delta"]) if a["delta"] is not None else "-"] for a in ab]))
        L.append("")
        if len(s["staged"]) >= 2 or s["baseline"]:
            noise = [abs(x["seed2"] - x["seed1"]) for x in s["baseline"] if x["seed1"] is not None]
            vals = [x["final_loss"] for x in s["staged"] if x["final_loss"] is not None]
            if len(vals) >= 2:
                noise.append(max(vals) - min(vals))
            if noise:
                L.append(f"Seed-to-seed differences measured above: up to {max(noise):.4f}; an ablation whose |difference| "
                         "is below that is not distinguishable from seed noise at this scale.")
    L.append("")
    # slope rule
    L.append("## Slope rule vs the oracle")
    L.append("")
    L.append("Where each slope-* run ended its first stage, against the planned switch (the staged-* run) and the "
             "oracle: the best switch point in hindsight on the small model's measured validation curve, assuming the "
             "grown model then follows the largest baseline's curve from the point of equal loss (the paper's analysis); "
             "\"at the end\" means the cost was still falling at the last measured point, so the oracle lies later.")
    L.append("")
    sl = res["slope"]
    if sl:
        L.append(_table(["run", "stage", "slope rule", "threshold", "slope at stage end", "planned switch", "oracle switch"],
                        [[x["run"], x["stage"],
                          (f"fired at step {x['ended_at']}" if x["fired"] else
                           (f"did not fire by step {x['ended_at']} (upper bound {x['upper_steps']})" if x["state"] == "done"
                            else "incomplete")),
                          _f(x.get("threshold")), _f(x["slope_at_end"]), f"step {x['planned_steps']}" if x["planned_steps"] else "-",
                          ("-" if not x["oracle"] else f"step {x['oracle']['step']} (loss {x['oracle']['loss']:.4f}"
                           f"{', at the end' if x['oracle']['at_end'] else ''})")] for x in sl]))
    if sl:
        L.append("")
        L.append("The threshold is the paper's (slope d log10 L / d log10 C of the smoothed validation curve, read "
                 "off the paper's GPT-2 curves); where the slope at the stage end is still below it, the curve was still "
                 "too steep for the rule, and the stage ran to its upper bound.")
    L.append("")
    L.append("## Notes")
    L.append("")
    shares = sorted(res.get("logit_share", {}).items())
    L.append("- The ledger counts 6 N_non-embedding + 12 L d s (attention) FLOPs per token, the convention MFU is "
             "usually reported on (and the one the planner's scaling law is fitted with). The output logit GEMM "
             "(d_model x vocab, tied to the embedding) is not in it; at these sizes it is a large share of the "
             "training FLOPs: " + ", ".join(f"{k} {100 * x:.0f}%" for k, x in shares) + " (logits / (logits + "
             "ledger)). Growth in depth keeps d_model, so a shallow first stage pays the full logit cost: its "
             "saving shrinks most when the logits are counted. Both readings are in the tables; the logits are V / (12 L d) of the "
             "6N term, 8.5% for a 1.3B GPT-2 and under 1% at 70B, so at scale the two readings agree closely. Wall time (indicative only: the machine is shared) is "
             "in the table.")
    L.append("- Plot: `docs/results/savings.png` (validation loss vs FLOPs, every run; stage boundaries marked).")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- plot
def plot(res: dict, out: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from megagrow.results.savings import read_curve as rc
    import yaml

    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    colors = {"width": "tab:blue", "depth": "tab:orange", "both": "tab:green"}
    for ax, zoom in zip(axes, (False, True)):
        for r in res["rows"]:
            name, kind = r["row"]["name"], r["kind"]
            p = plan_path(out, name)
            if not r["started"] or not os.path.isfile(p):
                continue
            with open(p) as f:
                plan = yaml.safe_load(f)
            c = rc(run_dir(out, name), [s["name"] for s in plan["stages"]], name)
            if not c.eval_flops:
                continue
            chain_kind = next((k for k in colors if f"-{k}" in name), None)
            style = dict(lw=1.2, alpha=0.9)
            if kind in ("sweep", "baseline", "seed2-baseline"):
                style.update(color="0.55" if kind != "seed2-baseline" else "0.75", lw=0.9, ls="-" if kind != "seed2-baseline" else ":")
            elif kind == "staged":
                style.update(color=colors.get(chain_kind, "k"), lw=1.8)
            elif kind == "slope":
                style.update(color=colors.get(chain_kind, "k"), ls="--", lw=1.5)
            elif kind == "ablation":
                knob = name.rsplit("-", 1)[-1]
                style.update(lw=1.0, ls="-.", color={"optreset": "tab:purple", "lrkeep": "tab:brown",
                                                      "lrrestart": "tab:pink", "nosym": "tab:olive"}.get(knob, "k"))
            else:
                style.update(color="k", ls=":", lw=1.5)
            label = name + ("" if r["done"] else " (incomplete)")
            ax.plot(c.eval_flops, c.eval_loss, label=label, **style)
            for sname, fl in c.stage_ends[:-1]:  # growth points
                i = min(range(len(c.eval_flops)), key=lambda j: abs(c.eval_flops[j] - fl))
                ax.plot([c.eval_flops[i]], [c.eval_loss[i]], marker="o", ms=4, color=style.get("color", "k"))
        if res["frontier"]:
            xs, ys = zip(*res["frontier"])
            ax.plot(xs, ys, "k-", marker="s", lw=2.2, ms=6, label="baseline curve (final losses)", zorder=5)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (ledger)")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3, which="both")
        if zoom and res["frontier"]:
            xs, ys = zip(*res["frontier"])
            ax.set_xlim(min(xs) * 0.5, max(xs) * 1.3)
            finals = [r["row"]["final_loss"] for r in res["rows"] if r["done"] and r["row"]["final_loss"] is not None]
            ax.set_ylim(min(finals + list(ys)) - 0.05, max(ys) + 0.3)
            ax.set_title("zoom: the end of the runs")
        else:
            ax.set_title("validation loss vs FLOPs (o: growth)")
    axes[0].legend(fontsize=6, ncol=2, loc="upper right")
    fig.tight_layout()
    tmp = png + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)


def write_text_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
