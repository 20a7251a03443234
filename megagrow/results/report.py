"""The savings report's numbers: every run's state and readings, the driver's choices (best LR,
headline run) and every table's values, as one dict (`build`); megagrow.results.render and
megagrow.results.figure turn it into docs/results/savings.md and savings.png. Also the law
calibrated on the first seed's from-scratch runs (`calibrate`), which the slope-rule runs use.
The runs' states and the baseline curves they are read against: megagrow.results.states.

Everything in the report is read from OUT (the experiment directory of tools/savings.py):
OUT/plans/<run>.yaml (the plan each run trained), OUT/runs/<run>/<stage>/log.jsonl and
status.json (what the trainer wrote), OUT/choices.json (the LR and headline choices the driver
made, themselves computed from logs). Nothing is typed in by hand.
"""

from __future__ import annotations

import json
import math
import os

from megagrow.config import ModelConfig
from megagrow.fsutil import read_json
from megagrow.metrics.flops import flops_per_token, logit_flops_per_token
from megagrow.results.experiment import ABLATIONS, KINDS, planner_split
from megagrow.results.savings import compare, mean_ci, oracle_switch
from megagrow.results.states import (
    READINGS,
    RunState,
    frontier,
    load_all,
    scratch_runs,
    shape_label,
    speed_after_growth,
    sweep_losses,
    transitions,
    wall_seconds,
)


# ----------------------------------------------------------------------------- the report
def corpus_info(data: str) -> dict:
    """What the report says about its corpus: the prefix, documents and tokens of each split, and
    a content hash (SHA-256 of the train and validation token files, first 16 hex digits)."""
    import hashlib

    from megagrow.data.dataset import TokenDataset, has_valid_split, valid_prefix

    out = {"prefix": data, "name": os.path.basename(os.path.normpath(data))}
    try:
        tr = TokenDataset(data)
        out.update(documents=int(tr.num_documents), train_tokens=int(tr.num_tokens))
        if has_valid_split(data):
            va = TokenDataset(valid_prefix(data))
            out.update(valid_documents=int(va.num_documents), valid_tokens=int(va.num_tokens))
        h = hashlib.sha256()
        for path in (data + ".bin", valid_prefix(data) + ".bin"):
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        h.update(chunk)
        out["sha256"] = h.hexdigest()[:16]
    except (OSError, ValueError) as e:
        out["error"] = str(e)
    return out


def _row(st: RunState, fronts: dict) -> dict:
    """A run against its own seed's curves, one reading each."""
    i = st.spec.info.get("seed_index", 0)
    out = {}
    for key, (_, total) in READINGS.items():
        c = st.curve_total if total else st.curve
        done = st.done and c is not None
        out[key] = compare(st.name, st.spec.kind, c.flops if done else None, c.final_loss if done else None, fronts[(i, key)]).to_dict()
    return out


def group_of(name: str) -> str:
    """A run's name without its seed suffix (staged-width-s2 -> staged-width)."""
    head, _, tail = name.rpartition("-s")
    return head if head and tail.isdigit() else name


def build(out: str, spec: dict, spec_path: str, data: str) -> dict:
    """All numbers of the report, as one dict (the markdown and the --json output)."""
    choices = read_json(os.path.join(out, "choices.json")) or {}
    states = load_all(out, spec, data, choices)
    n_seeds = len(spec["seeds"])
    fronts = {(i, key): frontier(states, i, strong, total) for i in range(n_seeds) for key, (strong, total) in READINGS.items()}
    longest = {}  # seed index -> its longest finished from-scratch run of the final size
    for i in range(n_seeds):
        done = [s for s in scratch_runs(states, i) if s.done and s.curve and s.curve.flops]
        longest[i] = max(done, key=lambda s: s.curve.flops, default=None)
    rows = []
    for st in states.values():
        c = st.curve
        stages = []
        if st.plan:
            for s, status in zip(st.plan["stages"], st.stages):
                stages.append(
                    {
                        "name": s["name"],
                        "shape": shape_label(s["model"]),
                        "steps": s["steps"],
                        "lr": (s.get("optim") or st.plan["defaults"]["optim"])["lr"],
                        "ran": (status or {}).get("step"),
                        "state": (status or {}).get("state", "pending"),
                        "stopped_by": (status or {}).get("stopped_by"),
                    }
                )
        rows.append(
            {
                "name": st.name,
                "group": group_of(st.name),
                "kind": st.spec.kind,
                "info": st.spec.info,
                "readings": _row(st, fronts),
                "done": st.done,
                "started": st.started,
                "stages": stages,
                "seed": st.spec.info.get("seed"),
                "seed_index": st.spec.info.get("seed_index"),
                "flops": c.flops if c else None,
                "final_loss": c.final_loss if c and st.done else None,
                "wall_s": wall_seconds(out, st),
                "tokens": c.tokens if c else None,
                "transitions": transitions(st) if st.done else [],
                "speed": speed_after_growth(st, longest.get(st.spec.info.get("seed_index", 0))),
            }
        )
    result = {
        "spec": spec_path,
        "out": out,
        "data": data,
        "corpus": corpus_info(data),
        "choices": choices,
        "rows": rows,
        "complete": [r["name"] for r in rows if r["done"]],
        "incomplete": [r["name"] for r in rows if not r["done"]],
        "frontiers": {f"{i}/{key}": [list(p) for p in f.points] for (i, key), f in fronts.items()},
        "splits": {k: planner_split(spec, k) for k in KINDS},
    }
    rd = os.path.join(out, "runs")
    result["not_in_spec"] = sorted(d for d in (os.listdir(rd) if os.path.isdir(rd) else []) if d not in states)
    failed = set(choices.get("failed", []))
    result["sweeps"] = {k: {f"{lr:g}": v for lr, v in sorted(sweep_losses(states, k, failed).items())} for k in choices.get("lr", {})}
    result["groups"] = _groups(rows, spec)
    result["baseline_seeds"] = _baseline_seeds(rows, spec, choices)
    result["slope"] = _slope_vs_oracle(states, spec, choices, result["groups"])
    result["logit_share"] = _logit_share(states)
    result["ablations"] = _ablations(rows, spec)
    return result


def _groups(rows: list, spec: dict) -> dict:
    """Per staged / slope / ablation run group: each seed's saving (every reading, against its
    own seed's curves), their mean and 95% interval over seeds, and the final-loss spread."""
    out = {}
    for r in rows:
        if r["kind"] not in ("staged", "slope", "ablation"):
            continue
        g = out.setdefault(r["group"], {"kind": r["kind"], "chain": r["info"].get("chain"), "runs": [], "seeds": []})
        g["runs"].append(r["name"])
        if r["done"]:
            g["seeds"].append(
                {
                    "run": r["name"],
                    "seed": r["seed"],
                    "final_loss": r["final_loss"],
                    "flops": r["flops"],
                    **{k: r["readings"][k]["saving"] for k in READINGS},
                    "speed": r["speed"],
                    "delta_loss": r["readings"]["strongest"]["delta_loss"],
                }
            )
    for g in out.values():
        for k in list(READINGS) + ["delta_loss", "speed"]:
            g[k] = mean_ci([x[k] for x in g["seeds"]])
        losses = [x["final_loss"] for x in g["seeds"]]
        g["loss"] = mean_ci(losses)
        g["not_reached"] = [x["run"] for x in g["seeds"] if x["strongest"] is None]
    return out


def _baseline_seeds(rows: list, spec: dict, choices: dict) -> list:
    """Per budget: each seed's final loss of the from-scratch run and their spread."""
    chosen = (choices.get("lr", {}).get("final") or {}).get("lr")
    out = []
    for b in spec["baseline_budgets"]:
        per = {}
        for r in rows:
            if r["done"] and r["info"].get("budget") == b and r["kind"] in ("baseline", "sweep"):
                if r["kind"] == "sweep" and r["info"]["lr"] != chosen:
                    continue
                per[r["seed_index"]] = r["final_loss"]
        vals = [per[i] for i in sorted(per)]
        out.append(
            {
                "budget": b,
                "losses": {str(i): v for i, v in sorted(per.items())},
                "spread": (max(vals) - min(vals)) if len(vals) >= 2 else None,
                **{"ci": mean_ci(vals)},
            }
        )
    return out


def _slope_vs_oracle(states: dict, spec: dict, choices: dict, groups: dict) -> list[dict]:
    """Per slope-* run: where the calibrated rule switched, the planned switch (the staged-* run
    of the first seed) and the oracle switch (the best point in hindsight on the slope run's
    small-model curve, the first seed's longest baseline as the big model's curve), with the
    saving of each (the oracle's as its analysis predicts it)."""
    big = max(
        (s for s in scratch_runs(states, 0) if s.spec.kind == "baseline" and s.done and s.curve),
        key=lambda s: s.curve.flops or 0,
        default=None,
    )
    cal = choices.get("calibration") or {}
    out = []
    for k in KINDS:
        st, planned = states.get(f"slope-{k}"), states.get(f"staged-{k}")
        if not st:
            continue
        thr = (cal.get("thresholds") or {}).get(k)
        sw = (cal.get("switches") or {}).get(k) or []
        row = {
            "run": st.name,
            "chain": k,
            "threshold": thr[0] if thr else None,
            "law_switch_step": sw[0].get("step") if sw and sw[0] else None,
            "planned_steps": planned.plan["stages"][0]["steps"] if planned and planned.plan else None,
            "upper_steps": st.plan["stages"][0]["steps"] if st.plan else None,
            "ended_at": None,
            "state": None,
            "fired": False,
            "oracle": None,
            "slope_at_end": None,
            "saving_rule": (groups.get(st.name) or {}).get("strongest", {}).get("mean"),
            "saving_planned": (groups.get(f"staged-{k}") or {}).get("strongest", {}).get("mean"),
            "saving_planned_seed1": next(
                (x["strongest"] for x in (groups.get(f"staged-{k}") or {}).get("seeds", []) if x["run"] == f"staged-{k}"), None
            ),
        }
        if st.plan:
            first = st.plan["stages"][0]["name"]
            status = st.stages[0] or {}
            row.update(ended_at=status.get("step"), state=status.get("state"), fired=status.get("stopped_by") == "slope")
            c = st.curve
            if c:
                idx = [i for i, s in enumerate(c.eval_stage) if s == first]
                fl, lo = [c.eval_flops[i] for i in idx], [c.eval_loss[i] for i in idx]
                steps = [c.eval_step[i] for i in idx]
                if len(fl) >= 2:
                    from megagrow.schedule.slope import smoothed_slopes

                    sl = smoothed_slopes(fl, lo, window=min(int(spec["slope"]["window"]), len(fl)))
                    row["slope_at_end"] = None if math.isnan(sl[-1]) else float(sl[-1])
                if big and len(fl) >= 2:
                    o = oracle_switch(fl, lo, big.curve.eval_flops, big.curve.eval_loss, big.curve.final_loss)
                    if o:
                        end = big.curve.flops
                        row["oracle"] = {
                            "step": steps[o["index"]],
                            "flops": o["flops"],
                            "loss": o["loss"],
                            "at_end": o["at_end"],
                            "big": big.name,
                            "saving": 1.0 - o["total"] / end if end else None,
                        }
        out.append(row)
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


def _ablations(rows: list, spec: dict) -> list[dict]:
    """Per ablation knob: its runs' final loss minus the base staged run's of the same seed
    (paired by seed), mean and 95% interval, and its saving on the strongest curve."""
    by = {r["name"]: r for r in rows}
    out = []
    for key, kb in ABLATIONS.items():
        what, base = kb.what, kb.chain or spec["ablation_base"]
        diffs, names = [], []
        for r in rows:
            if r["kind"] == "ablation" and r["info"].get("knob") == key:
                names.append(r["name"])
                b = by.get(r["info"]["of"])
                if r["done"] and b and b["done"]:
                    diffs.append(r["final_loss"] - b["final_loss"])
        out.append(
            {
                "knob": key,
                "what": what,
                "base": f"staged-{base}",
                "group": f"abl-{base}-{key}",
                "runs": names,
                "delta_vs_base": mean_ci(diffs),
                "diffs": diffs,
            }
        )
    return out


# ----------------------------------------------------------------------------- the calibrated law
def calibrate(states: dict, spec: dict, choices: dict) -> dict | None:
    """The law fitted to the first seed's from-scratch runs of every size (each at its chosen
    LR, mid-run eval points included), and per chain the switch loss, the small model's step
    there and the slope rule's threshold it implies, for the target = the first seed's
    reference-budget baseline's final loss. None until those runs are done; {"error": ...} when
    the fit is impossible (the slope-rule runs then cannot run)."""
    import numpy as np

    from megagrow.errors import UserError
    from megagrow.results.experiment import FINAL, chain, label, sweep_sizes
    from megagrow.schedule.calibrate import MIN_STEP_FRACTION, calibrated_switches, fit_law
    from megagrow.schedule.law import non_embedding_params

    lrs = choices.get("lr", {})
    sizes = sweep_sizes(spec)
    if not all(k in lrs for k in sizes):
        return None
    curves, used = [], []
    for key, (shape, _) in sizes.items():
        runs_ = [
            s
            for s in states.values()
            if s.spec.info.get("seed_index") == 0
            and (
                (s.spec.kind in ("sweep", "small-sweep") and s.spec.info["size"] == key and float(s.spec.info["lr"]) == lrs[key]["lr"])
                or (key == FINAL and s.spec.kind == "baseline")
            )
        ]
        if not runs_ or not all(s.done and s.curve for s in runs_):
            return None
        N = non_embedding_params(shape["n_layers"], shape["d_model"])
        warm = int(spec["optim"].get("warmup_steps", 0))
        for s in runs_:
            steps, losses = np.array(s.curve.eval_step, dtype=float), np.array(s.curve.eval_loss, dtype=float)
            keep = steps >= max(warm, MIN_STEP_FRACTION * steps.max())  # past warm-up, as `megagrow plan --calibrate`
            curves.append((N, steps[keep], losses[keep]))
            used.append(s.name)
    ref = next(
        (
            s
            for s in states.values()
            if s.spec.kind == "baseline" and s.spec.info.get("seed_index") == 0 and s.spec.info["budget"] == spec["staged_tokens"]
        ),
        None,
    )
    if ref is None or not (ref.done and ref.curve):
        return None
    target = float(ref.curve.final_loss)
    try:
        law, info = fit_law(curves)
        out = {"fit": info, "runs": used, "target": target, "thresholds": {}, "switches": {}}
        for k in ("width", "depth", "both"):
            shapes = [c["shape"] for c in chain(spec, k)]
            sw = calibrated_switches(law, [non_embedding_params(s["n_layers"], s["d_model"]) for s in shapes], target)
            # one entry per growing stage of the chain; None where the fitted law's planner grows
            # straight through that size (the stage then runs its planned steps, no slope rule)
            by_n = {float(x["from_N"]): x for x in sw}
            per_stage = [by_n.get(non_embedding_params(s["n_layers"], s["d_model"])) for s in shapes[:-1]]
            out["switches"][k] = [
                None
                if x is None
                else {
                    "threshold": x["threshold"],
                    "step": x["small_step"],
                    "switch_loss": x["switch_loss"],
                    "paper_threshold": x.get("paper_threshold"),
                }
                for x in per_stage
            ]
            out["thresholds"][k] = [None if x is None else float(x["threshold"]) for x in per_stage]
            out["sizes_" + k] = [label(s) for s in shapes]
        return json.loads(json.dumps(out, default=float))
    except UserError as e:
        return {"error": str(e), "runs": used, "target": target}
