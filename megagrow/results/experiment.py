"""The savings experiment as data: the spec (recipes/savings/experiment.yaml) -> the list of
runs, each a plan built when what it depends on has finished.

Runs (names are their run directories under OUT/runs/):
  sweep-lr<LR>             final size from scratch at the sweep budget, one per peak LR
  base-<B>                 final size from scratch at budget B x reference tokens, the best LR
                           (the sweep run of the best LR is the baseline at the sweep budget)
  staged-<kind>            width / depth / both: stage tokens split as `megagrow plan` says
  slope-<kind>             the same, each growing stage ended by the slope rule (at most
                           `slope.upper` x its planned steps); the last stage as planned
  abl-<base>-<knob>        the ablation base (a staged run) with one knob changed:
                           optreset (optimizer state reset), lrkeep / lrrestart (LR placement),
                           nosym (no symmetry-breaking noise)
  seed2-<best>, seed2-base-<B>   the headline pair again with the second seed: the best staged
                           run (chosen when the staged, slope and baseline runs are done) and
                           the baselines at `headline_budgets`

Every run uses the same layout, batch, eval set and schedule shape: cosine from the peak LR to
min_lr_ratio x peak, warmup `warmup_steps`, the schedule of each from-scratch run ending at its
own budget (fully decayed). Staged runs follow the project defaults for LR placement
(`paper`) and re-warmup (none); each stage's schedule ends with the stage.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from megagrow.config import Plan, Stage
from megagrow.errors import UserError

KINDS = ("width", "depth", "both")
ABLATIONS = {
    "optreset": ("optimizer state reset at growth", {"growth": {"optimizer_state": "reset"}}),
    "lrkeep": ("LR placement keep", {"optim": {"lr_placement": "keep"}}),
    "lrrestart": ("LR placement restart", {"optim": {"lr_placement": "restart"}}),
    "nosym": ("no symmetry breaking", {"growth": {"symmetry_breaking": 0.0}}),
}


def load_spec(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"experiment spec not found: {path}")
    with open(path) as f:
        try:
            spec = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    need = ("name", "seeds", "reference_tokens", "model", "final", "smaller", "layout", "optim", "eval",
            "baseline_budgets", "lr_sweep", "staged_tokens", "slope", "ablation_base", "headline_budgets")
    missing = [k for k in need if k not in (spec or {})]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}")
    if len(spec["baseline_budgets"]) < 4:
        raise UserError(f"{path}: baseline_budgets needs at least 4 budgets, got {spec['baseline_budgets']}")
    if len(spec["lr_sweep"]["lrs"]) < 3:
        raise UserError(f"{path}: lr_sweep.lrs needs at least 3 values")
    if spec["lr_sweep"]["budget"] not in spec["baseline_budgets"]:
        raise UserError(f"{path}: lr_sweep.budget must be one of baseline_budgets")
    if spec["ablation_base"] not in KINDS:
        raise UserError(f"{path}: ablation_base must be one of {', '.join(KINDS)}")
    return spec


# ----------------------------------------------------------------------------- plan pieces
def batch_tokens(spec: dict) -> int:
    return int(spec["layout"].get("micro_batch", 4)) * int(spec["layout"].get("grad_accum", 1)) \
        * int(spec["layout"].get("dp", 1)) * int(spec["model"]["seq_len"])


def steps_for(spec: dict, budget: float) -> int:
    return max(1, int(round(budget * spec["reference_tokens"] / batch_tokens(spec))))


def _model(spec: dict, shape: dict) -> dict:
    return {**spec["model"], **shape}


def _stage_fields() -> set:
    import dataclasses

    return {f.name for f in dataclasses.fields(Stage)}


def _defaults(spec: dict, lr: float) -> dict:
    o = dict(spec["optim"])
    ratio = float(o.pop("min_lr_ratio", 0.1))
    d = {"layout": dict(spec["layout"]), "optim": {**o, "lr": float(lr), "min_lr": float(lr) * ratio},
         "log_every": int(spec.get("log_every", 10)), "save_every": int(spec.get("save_every", 100))}
    fields = _stage_fields()
    for k, v in spec["eval"].items():  # eval_every / eval_tokens, where this version of the trainer has them
        if k in fields:
            d[k] = v
    return d


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def chain(spec: dict, kind: str) -> list[dict]:
    """The model shapes of a staged run, smallest first, and the operator into each."""
    sm = spec["smaller"][kind]
    if kind == "both":
        return [{"shape": sm[0]}, {"shape": sm[1], "grow": "width"}, {"shape": spec["final"], "grow": "depth"}]
    return [{"shape": sm}, {"shape": spec["final"], "grow": kind}]


def planner_split(spec: dict, kind: str) -> dict:
    """`megagrow plan --sizes ...` for the chain (Kaplan law, default target): each stage's share
    of the tokens, and the command that prints it."""
    from megagrow.schedule import planner
    from megagrow.schedule.law import non_embedding_params

    shapes = [c["shape"] for c in chain(spec, kind)]
    sizes = [non_embedding_params(s["n_layers"], s["d_model"]) for s in shapes]
    plan = planner.plan_stages(sizes, planner.paper_target_loss(sizes[-1]))
    if len(plan.stages) != len(sizes):
        raise UserError(f"megagrow plan skips a stage of the {kind} chain (the law says grow straight through it)")
    tokens = [s.tokens for s in plan.stages]
    return {"fractions": [t / sum(tokens) for t in tokens], "predicted_saving": plan.saving,
            "command": "megagrow plan --sizes " + ",".join(f"{s['n_layers']}x{s['d_model']}" for s in shapes)}


STAGE_NAMES = {2: ["small", "final"], 3: ["small", "mid", "final"]}


def staged_plan(spec: dict, name: str, kind: str, lr: float, seed: int, data: str,
                slope: bool = False, over: dict | None = None) -> dict:
    split = planner_split(spec, kind)
    total = steps_for(spec, spec["staged_tokens"])
    steps = [max(1, int(round(f * total))) for f in split["fractions"]]
    steps[-1] = max(1, total - sum(steps[:-1]))
    c = chain(spec, kind)
    names = STAGE_NAMES[len(c)]
    stages = []
    for i, (link, n) in enumerate(zip(c, steps)):
        st = {"name": names[i], "model": _model(spec, link["shape"]), "steps": n}
        if link.get("grow"):
            st["grow"] = link["grow"]
        if slope and i < len(c) - 1:
            sl = spec["slope"]
            st["steps"] = int(math.ceil(sl["upper"] * n))
            st["stop"] = {"rule": "slope", "window": int(sl["window"]), "min_steps": min(int(sl["min_steps"]), st["steps"])}
        if over and i > 0:
            st = _merge(st, over)
        stages.append(st)
    return {"name": name, "seed": seed, "data": {"prefix": data}, "defaults": _defaults(spec, lr), "stages": stages}


def baseline_plan(spec: dict, name: str, budget: float, lr: float, seed: int, data: str) -> dict:
    st = {"name": "final", "model": _model(spec, spec["final"]), "steps": steps_for(spec, budget)}
    return {"name": name, "seed": seed, "data": {"prefix": data}, "defaults": _defaults(spec, lr), "stages": [st]}


# ----------------------------------------------------------------------------- the run list
@dataclass
class RunSpec:
    name: str
    kind: str  # sweep | baseline | staged | slope | ablation | seed2-staged | seed2-baseline
    deps: list = field(default_factory=list)
    build: Optional[Callable] = None  # ctx -> plan dict
    info: dict = field(default_factory=dict)


def _fmt_budget(b: float) -> str:
    return f"{b:g}"


def runs(spec: dict, data: str) -> list[RunSpec]:
    """Every run of the experiment, in priority order (what starts first when there is room)."""
    s1, s2 = spec["seeds"][0], spec["seeds"][1]
    sw = spec["lr_sweep"]
    sweep = [f"sweep-lr{lr:g}" for lr in sw["lrs"]]
    out = [RunSpec(n, "sweep", [], (lambda ctx, n=n, lr=lr: baseline_plan(spec, n, sw["budget"], lr, s1, data)),
                   {"budget": sw["budget"], "lr": lr, "seed": s1}) for n, lr in zip(sweep, sw["lrs"])]
    for b in spec["baseline_budgets"]:
        if b == sw["budget"]:
            continue
        n = f"base-{_fmt_budget(b)}"
        out.append(RunSpec(n, "baseline", sweep, lambda ctx, n=n, b=b: baseline_plan(spec, n, b, ctx["lr"], s1, data),
                           {"budget": b, "seed": s1}))
    for k in KINDS:
        n = f"staged-{k}"
        out.append(RunSpec(n, "staged", sweep, lambda ctx, n=n, k=k: staged_plan(spec, n, k, ctx["lr"], s1, data),
                           {"chain": k, "seed": s1}))
    for b in spec["headline_budgets"]:
        n = f"seed2-base-{_fmt_budget(b)}"
        out.append(RunSpec(n, "seed2-baseline", sweep, lambda ctx, n=n, b=b: baseline_plan(spec, n, b, ctx["lr"], s2, data),
                           {"budget": b, "seed": s2}))
    for k in KINDS:
        n = f"slope-{k}"
        out.append(RunSpec(n, "slope", sweep, lambda ctx, n=n, k=k: staged_plan(spec, n, k, ctx["lr"], s1, data, slope=True),
                           {"chain": k, "seed": s1}))
    heads = [r.name for r in out if r.kind in ("baseline", "staged", "slope")] + sweep

    def seed2_staged(ctx):
        best = ctx["headline"]
        kind, slope = best.split("-", 1)[1], best.startswith("slope-")
        return staged_plan(spec, "seed2-staged", kind, ctx["lr"], s2, data, slope=slope)

    out.append(RunSpec("seed2-staged", "seed2-staged", heads, seed2_staged, {"seed": s2}))
    base = spec["ablation_base"]
    for key, (what, over) in ABLATIONS.items():
        n = f"abl-{base}-{key}"
        out.append(RunSpec(n, "ablation", sweep,
                           lambda ctx, n=n, over=over: staged_plan(spec, n, base, ctx["lr"], s1, data, over=over),
                           {"chain": base, "knob": key, "what": what, "of": f"staged-{base}", "seed": s1}))
    # priority: the sweep, then the baseline nearest the staged runs' budget and the ablation base's
    # staged run (the first comparison that can be read off), then the rest in the order above
    near = min((r for r in out if r.kind == "baseline"), key=lambda r: abs(r.info["budget"] - spec["staged_tokens"]))
    first = [r for r in out if r.kind == "sweep"] + [near] + [r for r in out if r.name == f"staged-{base}"]
    return first + [r for r in out if r not in first]


def plan_of(d: dict) -> Plan:
    return Plan.from_dict(json.loads(json.dumps(d)), d["name"])
