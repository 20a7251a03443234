"""The savings experiment as data: the spec (recipes/savings/experiment.yaml) and the driver's
choices so far (OUT/choices.json) -> the list of runs, each a plan built when what it depends on
has finished.

Runs (names are their run directories under OUT/runs/; seed suffix "" for the first seed,
"-s2", "-s3" for the others):
  sweep-lr<LR>             final size from scratch at the sweep budget, one per peak LR (first
                           seed); the best one is also the first seed's baseline at that budget
  small-<LxD>-lr<LR>       a first-stage size from scratch for its stage's planned steps (the
                           first stage of a staged run on its own), one per peak LR
  base-<B><seed>           final size from scratch at budget B x reference tokens, the final
                           size's best LR, every seed
  staged-<kind><seed>      width / depth / both: stage tokens split as `megagrow plan` says; each
                           stage at the best LR of its own size; every seed
  slope-<kind>             the same, each growing stage ended by the slope rule with the
                           threshold of the law calibrated on the first seed's from-scratch runs
                           (at most `slope.upper` x its planned steps); the last stage as planned
  abl-<base>-<knob><seed>  the ablation base (a staged run) with one knob changed (ABLATIONS)

Both LR sweeps extend themselves: while the best LR is the smallest (largest) tried, the next run
tries it / factor (x factor), up to `max_runs`; the choice and whether it is bracketed go to
OUT/choices.json and the report. Every run uses the same layout, batch, eval set and schedule
shape: cosine from the peak LR to min_lr_ratio x peak, warmup `warmup_steps`, the schedule of
each from-scratch run ending at its own budget (fully decayed); each stage of a staged run ends
its own schedule; LR placement `paper`, no re-warmup (the project defaults).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from megagrow.config import Plan, Stage
from megagrow.errors import UserError

KINDS = ("width", "depth", "both")
FINAL = "final"  # the sweep key of the final size


# knob -> what it changes, stage overrides of the grown stages, the first stage's share of its
# planned steps, the chain it changes (None: the spec's ablation_base), and whether every stage
# runs at the final size's LR instead of its own size's
@dataclass(frozen=True)
class Knob:
    what: str
    over: dict = field(default_factory=dict)
    first_factor: float = 1.0
    chain: str | None = None
    final_lr: bool = False


ABLATIONS = {
    "lrrestart": Knob("LR placement restart (the grown stage starts its schedule again)", {"optim": {"lr_placement": "restart"}}),
    "sym4": Knob("symmetry-breaking noise 4 x init_std (default 1)", {"growth": {"symmetry_breaking": 4.0}}),
    "early": Knob("growth at half the planned first-stage steps (the rest to the grown stage)", first_factor=0.5),
    "fresh": Knob("fresh units (`width:init`): new heads and neurons initialised, output weights 0", {"grow": "width:init"}),
    "freshrestart": Knob("fresh units and LR placement restart", {"grow": "width:init", "optim": {"lr_placement": "restart"}}),
    "lrhalf": Knob(
        "the grown stage at half the final size's LR (its copies act as the small model at k x its LR)", {"optim": {"lr_scale": 0.5}}
    ),
    "freshlrhalf": Knob("fresh units and the grown stage at half the LR", {"grow": "width:init", "optim": {"lr_scale": 0.5}}),
    "lr2restart": Knob(
        "the grown stage at twice the final size's LR, its schedule restarted", {"optim": {"lr_scale": 2.0, "lr_placement": "restart"}}
    ),
    "lrfinal": Knob("every stage at the final size's LR (the small 3x96 stage untuned)", chain="both", final_lr=True),
    "wlrfinal": Knob("both stages at the final size's LR (the small 6x96 stage untuned)", chain="width", final_lr=True),
    "dlrfinal": Knob("both stages at the final size's LR (the small 3x192 stage untuned)", chain="depth", final_lr=True),
}


def load_spec(path: str) -> dict:
    """The spec at `path`; a spec with `extends: OTHER.yaml` (relative to its own directory) is
    that spec with this one's keys replacing its keys."""
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"experiment spec not found: {path}")
    with open(path) as f:
        try:
            spec = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(spec, dict) and "extends" in spec:
        base = load_spec(os.path.join(os.path.dirname(path), str(spec.pop("extends"))))
        spec = {**base, **spec}
    unknown = set((spec or {}).get("ablations") or {}) - set(ABLATIONS)
    if unknown:
        raise UserError(f"{path}: unknown ablation knob(s) {', '.join(sorted(unknown))} (known: {', '.join(ABLATIONS)})")
    need = (
        "name",
        "seeds",
        "reference_tokens",
        "model",
        "final",
        "smaller",
        "layout",
        "optim",
        "eval",
        "baseline_budgets",
        "lr_sweep",
        "staged_tokens",
        "slope",
        "ablation_base",
    )
    missing = [k for k in need if k not in (spec or {})]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}")
    if len(spec["seeds"]) < 1 or len(set(spec["seeds"])) != len(spec["seeds"]):
        raise UserError(f"{path}: seeds must be distinct integers, got {spec['seeds']}")
    if len(spec["baseline_budgets"]) < 4:
        raise UserError(f"{path}: baseline_budgets needs at least 4 budgets, got {spec['baseline_budgets']}")
    sw = spec["lr_sweep"]
    if len(sw["lrs"]) < 3:
        raise UserError(f"{path}: lr_sweep.lrs needs at least 3 values")
    if float(sw.get("factor", 2)) <= 1 or int(sw.get("max_runs", 6)) < len(sw["lrs"]):
        raise UserError(f"{path}: lr_sweep.factor must be > 1 and max_runs >= the number of lrs")
    if sw["budget"] not in spec["baseline_budgets"]:
        raise UserError(f"{path}: lr_sweep.budget must be one of baseline_budgets")
    if spec["ablation_base"] not in KINDS:
        raise UserError(f"{path}: ablation_base must be one of {', '.join(KINDS)}")
    return spec


# ----------------------------------------------------------------------------- LR brackets
def bracket(losses: dict, factor: float, max_runs: int) -> dict:
    """The next step of a self-extending LR sweep. `losses`: LR -> final validation loss (None:
    not finished yet; inf or NaN: diverged). Returns {"state": "wait"} while a run is unfinished,
    {"state": "extend", "lr": x} while the best LR is the smallest (x = best / factor) or the
    largest (best x factor) tried and fewer than `max_runs` ran, else {"state": "done", "lr":
    best, "bracketed": whether the best is interior}."""
    if not losses or any(v is None for v in losses.values()):
        return {"state": "wait"}
    key = lambda lr: losses[lr] if math.isfinite(losses[lr]) else math.inf  # noqa: E731
    lrs = sorted(losses)
    best = min(lrs, key=lambda lr: (key(lr), lr))
    if math.isinf(key(best)):
        raise UserError(f"every LR of the sweep diverged: {', '.join(f'{x:g}' for x in lrs)}")
    edge = best in (lrs[0], lrs[-1])
    if edge and len(lrs) < max_runs:
        return {"state": "extend", "lr": float(f"{(best / factor if best == lrs[0] else best * factor):.6g}")}
    return {"state": "done", "lr": best, "bracketed": not edge}


# ----------------------------------------------------------------------------- plan pieces
def batch_tokens(spec: dict) -> int:
    return (
        int(spec["layout"].get("micro_batch", 4))
        * int(spec["layout"].get("grad_accum", 1))
        * int(spec["layout"].get("dp", 1))
        * int(spec["model"]["seq_len"])
    )


def steps_for(spec: dict, budget: float) -> int:
    return max(1, int(round(budget * spec["reference_tokens"] / batch_tokens(spec))))


def label(shape: dict) -> str:
    return f"{shape['n_layers']}x{shape['d_model']}"


def _model(spec: dict, shape: dict) -> dict:
    return {**spec["model"], **shape}


def _stage_fields() -> set:
    import dataclasses

    return {f.name for f in dataclasses.fields(Stage)}


def _optim(spec: dict, lr: float) -> dict:
    o = dict(spec["optim"])
    ratio = float(o.pop("min_lr_ratio", 0.1))
    return {**o, "lr": float(lr), "min_lr": float(lr) * ratio}


def _defaults(spec: dict, lr: float) -> dict:
    d = {
        "layout": dict(spec["layout"]),
        "optim": _optim(spec, lr),
        "log_every": int(spec.get("log_every", 10)),
        "save_every": int(spec.get("save_every", 100)),
    }
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
    return {
        "fractions": [t / sum(tokens) for t in tokens],
        "predicted_saving": plan.saving,
        "command": "megagrow plan --sizes " + ",".join(f"{s['n_layers']}x{s['d_model']}" for s in shapes),
    }


def planned_steps(spec: dict, kind: str) -> list[int]:
    split = planner_split(spec, kind)
    total = steps_for(spec, spec["staged_tokens"])
    steps = [max(1, int(round(f * total))) for f in split["fractions"]]
    steps[-1] = max(1, total - sum(steps[:-1]))
    return steps


def sweep_sizes(spec: dict) -> dict:
    """label -> (shape, steps) of every size with its own LR sweep: the final size at the sweep
    budget, and each smaller size of a chain at the planned steps of the first stage it is in."""
    out = {FINAL: (spec["final"], steps_for(spec, spec["lr_sweep"]["budget"]))}
    for k in KINDS:
        steps = planned_steps(spec, k)
        for i, link in enumerate(chain(spec, k)[:-1]):
            out.setdefault(label(link["shape"]), (link["shape"], steps[i]))
    return out


STAGE_NAMES = {2: ["small", "final"], 3: ["small", "mid", "final"]}


def staged_plan(
    spec: dict,
    name: str,
    kind: str,
    lrs: dict,
    seed: int,
    data: str,
    thresholds: list | None = None,
    over: dict | None = None,
    first_factor: float = 1.0,
) -> dict:
    """A staged run: `lrs` maps each size label (and FINAL) to its peak LR; `thresholds`: the
    slope rule's threshold of each growing stage (a slope-rule run; None for a stage: its planned
    steps, no rule), else None; `over`: stage
    overrides of every grown stage; `first_factor`: the first stage's share of its planned steps
    (the steps it gives up go to the last stage)."""
    steps = planned_steps(spec, kind)
    if first_factor != 1.0:
        n0 = max(1, int(round(first_factor * steps[0])))
        steps[-1] += steps[0] - n0
        steps[0] = n0
    c = chain(spec, kind)
    names = STAGE_NAMES[len(c)]
    stages = []
    for i, (link, n) in enumerate(zip(c, steps)):
        last = i == len(c) - 1
        st = {
            "name": names[i],
            "model": _model(spec, link["shape"]),
            "steps": n,
            "optim": _optim(spec, lrs[FINAL if last else label(link["shape"])]),
        }
        if link.get("grow"):
            st["grow"] = link["grow"]
        if thresholds is not None and not last and thresholds[i] is not None:
            sl = spec["slope"]
            st["steps"] = int(math.ceil(sl["upper"] * n))
            st["stop"] = {
                "rule": "slope",
                "threshold": float(thresholds[i]),
                "window": int(sl["window"]),
                "min_steps": min(int(sl["min_steps"]), st["steps"]),
            }
        if thresholds is not None and "eval_every" in spec["slope"]:
            st["eval_every"] = int(spec["slope"]["eval_every"])
        if over and i > 0:
            st = _merge(st, over)
            scale = st["optim"].pop("lr_scale", None)
            if scale is not None:
                st["optim"] = _optim(spec, float(scale) * st["optim"]["lr"])
        stages.append(st)
    return {"name": name, "seed": seed, "data": {"prefix": data}, "defaults": _defaults(spec, lrs[FINAL]), "stages": stages}


def scratch_plan(spec: dict, name: str, shape: dict, steps: int, lr: float, seed: int, data: str) -> dict:
    """One size from scratch for `steps`, its schedule decaying fully within them."""
    st = {"name": "final" if shape == spec["final"] else "small", "model": _model(spec, shape), "steps": int(steps)}
    return {"name": name, "seed": seed, "data": {"prefix": data}, "defaults": _defaults(spec, lr), "stages": [st]}


# ----------------------------------------------------------------------------- the run list
@dataclass
class RunSpec:
    name: str
    kind: str  # sweep | small-sweep | baseline | staged | slope | ablation
    deps: list = field(default_factory=list)
    build: Callable | None = None  # choices -> plan dict
    info: dict = field(default_factory=dict)  # seed (index and value), budget, lr, size, chain, knob...
    needs: tuple = ()  # choices this run waits for: ("lr", size label) or ("calibration",)


def seed_suffix(i: int) -> str:
    return "" if i == 0 else f"-s{i + 1}"


def sweep_lrs(spec: dict, choices: dict, key: str) -> list[float]:
    """The LRs of one sweep: the spec's, plus what the driver added to bracket the best."""
    return sorted({float(x) for x in spec["lr_sweep"]["lrs"]} | {float(x) for x in choices.get("sweeps", {}).get(key, [])})


def sweep_name(key: str, lr: float) -> str:
    return f"sweep-lr{lr:g}" if key == FINAL else f"small-{key}-lr{lr:g}"


def _lrs(choices: dict) -> dict:
    return {k: v["lr"] for k, v in choices.get("lr", {}).items()}


def _sweep_runs(spec: dict, data: str, ch: dict) -> list[RunSpec]:
    """The LR sweeps of every size (first seed), one run per LR tried so far."""
    seeds = list(spec["seeds"])
    out: list[RunSpec] = []
    for key, (shape, steps) in sweep_sizes(spec).items():
        for lr in sweep_lrs(spec, ch, key):
            n = sweep_name(key, lr)
            out.append(
                RunSpec(
                    n,
                    "sweep" if key == FINAL else "small-sweep",
                    [],
                    lambda c, n=n, shape=shape, steps=steps, lr=lr: scratch_plan(spec, n, shape, steps, lr, seeds[0], data),
                    {
                        "size": key,
                        "lr": lr,
                        "seed": seeds[0],
                        "seed_index": 0,
                        "steps": steps,
                        "budget": spec["lr_sweep"]["budget"] if key == FINAL else None,
                    },
                )
            )
    return out


def _chain_needs(spec: dict, kind: str) -> tuple:
    """The choices a staged run of this chain waits for: the best LR of each of its sizes."""
    return tuple(("lr", label(link["shape"])) for link in chain(spec, kind)[:-1]) + (("lr", FINAL),)


def _baseline_and_staged_runs(spec: dict, data: str) -> tuple[list[RunSpec], list[RunSpec]]:
    """Every seed's from-scratch baselines (the first seed's at the sweep budget is the sweep's
    best run, not listed again) and staged runs of each chain."""
    staged, baselines = [], []
    for i, s in enumerate(spec["seeds"]):
        for b in spec["baseline_budgets"]:
            if i == 0 and b == spec["lr_sweep"]["budget"]:
                continue  # the sweep's best run
            n = f"base-{b:g}{seed_suffix(i)}"
            baselines.append(
                RunSpec(
                    n,
                    "baseline",
                    [],
                    lambda c, n=n, b=b, s=s: scratch_plan(spec, n, spec["final"], steps_for(spec, b), c["lr"][FINAL]["lr"], s, data),
                    {"budget": b, "seed": s, "seed_index": i},
                    (("lr", FINAL),),
                )
            )
        for k in KINDS:
            n = f"staged-{k}{seed_suffix(i)}"
            staged.append(
                RunSpec(
                    n,
                    "staged",
                    [],
                    lambda c, n=n, k=k, s=s: staged_plan(spec, n, k, _lrs(c), s, data),
                    {"chain": k, "seed": s, "seed_index": i},
                    _chain_needs(spec, k),
                )
            )
    return baselines, staged


def _slope_runs(spec: dict, data: str) -> list[RunSpec]:
    """One slope-rule run per chain (first seed), once the law is calibrated."""
    seed = spec["seeds"][0]
    return [
        RunSpec(
            f"slope-{k}",
            "slope",
            [],
            lambda c, k=k: staged_plan(spec, f"slope-{k}", k, _lrs(c), seed, data, thresholds=c["calibration"]["thresholds"][k]),
            {"chain": k, "seed": seed, "seed_index": 0},
            _chain_needs(spec, k) + (("calibration",),),
        )
        for k in KINDS
    ]


def _ablation_runs(spec: dict, data: str) -> list[RunSpec]:
    """The ablation base with one knob changed, for as many seeds as the spec gives each knob."""
    abl = []
    n_abl = {k: int(spec.get("ablation_seeds", 1)) for k in ABLATIONS}
    if spec.get("ablations") is not None:  # knob -> how many seeds it runs with (knobs not named: none)
        n_abl = {k: int(spec["ablations"].get(k, 0)) for k in ABLATIONS}
    for i, s in enumerate(spec["seeds"]):
        for key, kb in ABLATIONS.items():
            if i >= n_abl[key]:
                continue
            base = kb.chain or spec["ablation_base"]
            n = f"abl-{base}-{key}{seed_suffix(i)}"
            abl.append(
                RunSpec(
                    n,
                    "ablation",
                    [],
                    lambda c, n=n, kb=kb, s=s, base=base: staged_plan(
                        spec,
                        n,
                        base,
                        {k: _lrs(c)[FINAL] for k in _lrs(c)} if kb.final_lr else _lrs(c),
                        s,
                        data,
                        over=kb.over or None,
                        first_factor=kb.first_factor,
                    ),
                    {"chain": base, "knob": key, "what": kb.what, "of": f"staged-{base}{seed_suffix(i)}", "seed": s, "seed_index": i},
                    _chain_needs(spec, base),
                )
            )
    return abl


def runs(spec: dict, data: str, choices: dict | None = None) -> list[RunSpec]:
    """Every run of the experiment so far, in priority order (what starts first when there is room).
    The sweeps grow as the driver extends them (`choices`)."""
    out = _sweep_runs(spec, data, choices or {})
    baselines, staged = _baseline_and_staged_runs(spec, data)
    slope = _slope_runs(spec, data)
    abl = _ablation_runs(spec, data)
    # priority: sweeps; the first seed's reference baseline and staged runs (the first readings);
    # its other baselines; the other seeds (the intervals); the first seed's ablations; the slope
    # runs (once calibrated); the other seeds' ablations
    first = [r for r in baselines if r.info["seed_index"] == 0 and r.info["budget"] == spec["staged_tokens"]]
    first += [r for r in staged if r.info["seed_index"] == 0]
    first += [r for r in baselines if r.info["seed_index"] == 0 and r not in first]
    rest = [r for r in baselines + staged if r not in first]
    rest.sort(key=lambda r: r.info["seed_index"])
    abl0 = [r for r in abl if r.info["seed_index"] == 0]
    return out + first + rest + abl0 + slope + [r for r in abl if r not in abl0]


def plan_of(d: dict) -> Plan:
    return Plan.from_dict(json.loads(json.dumps(d)), d["name"])
