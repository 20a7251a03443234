"""Each run of the savings experiment as its files in OUT say: the plan it trains, its stages'
status, its validation curve on the trainer's FLOPs ledger (and with the logit GEMM added), its
growths and wall time; and the baseline curves a run is read against (the lower envelope of a
seed's from-scratch runs, `frontier`). megagrow.results.report builds the report's tables from
these; the driver reads them to decide what runs next.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from megagrow.config import ModelConfig
from megagrow.fsutil import read_json
from megagrow.metrics.flops import logit_flops_per_token
from megagrow.paths import StagePaths
from megagrow.results.experiment import RunSpec, runs
from megagrow.results.savings import Curve, Frontier, read_curve


# ----------------------------------------------------------------------------- run state
@dataclass
class RunState:
    spec: RunSpec
    dir: str = ""  # OUT/runs/<name>
    plan: dict | None = None  # the plan it trains (OUT/plans/<name>.yaml), None before it is built
    stages: list = field(default_factory=list)  # status.json of each stage (None where absent)
    curve: Curve | None = None  # FLOPs on the trainer's ledger
    curve_total: Curve | None = None  # the same points, FLOPs with the logit GEMM added

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
        st.stages = [read_json(StagePaths(os.path.join(run_dir(out, spec.name), n)).status) for n in names]
        if st.started:
            st.curve = read_curve(run_dir(out, spec.name), names, spec.name)
            logits = [float(logit_flops_per_token(ModelConfig.from_dict(s["model"]))) for s in st.plan["stages"]]
            st.curve_total = read_curve(run_dir(out, spec.name), names, spec.name, extra_per_token=logits)
    return st


def load_all(out: str, spec: dict, data: str, choices: dict | None = None) -> dict:
    """Every run's state; `choices` (default: OUT/choices.json) says which sweep runs exist."""
    if choices is None:
        choices = read_json(os.path.join(out, "choices.json")) or {}
    return {r.name: load_state(out, r) for r in runs(spec, data, choices)}


def sweep_losses(states: dict, key: str, failed: set) -> dict:
    """LR -> final validation loss of the sweep of size `key` (None: not finished; inf: failed,
    which a sweep run does when its LR makes it diverge)."""
    out = {}
    for s in states.values():
        if s.spec.kind in ("sweep", "small-sweep") and s.spec.info["size"] == key:
            lr = float(s.spec.info["lr"])
            if s.name in failed:
                out[lr] = math.inf
            elif s.done and s.curve and s.curve.final_loss is not None:
                out[lr] = float(s.curve.final_loss)
            else:
                out[lr] = None
    return out


# ----------------------------------------------------------------------------- baseline curves
def scratch_runs(states: dict, seed_index: int) -> list:
    """The from-scratch runs of the final size with this seed (the first seed's LR sweep
    included: every LR it tried is a from-scratch run someone could have made)."""
    return [
        s for s in states.values() if s.spec.info.get("seed_index") == seed_index and (s.spec.kind == "baseline" or s.spec.kind == "sweep")
    ]


def frontier(states: dict, seed_index: int, strongest: bool = True, total: bool = False) -> Frontier:
    """A seed's baseline curve: `strongest` over every eval point of its from-scratch runs (mid-run
    included, any run that has started), else over the final points of its finished runs (the
    decayed-only reading); `total`: on FLOPs with the logit GEMM added."""
    pts = []
    for s in scratch_runs(states, seed_index):
        c = s.curve_total if total else s.curve
        if c is None or not c.eval_loss:
            continue
        if strongest:
            pts += list(zip(c.eval_flops, c.eval_loss))
        elif s.done:
            pts.append((c.eval_flops[-1], c.eval_loss[-1]))
    return Frontier.of(pts)


# reading -> (strongest, total): the arguments of `frontier` that draw its curve
READINGS = {"strongest": (True, False), "decayed": (False, False), "strongest_logits": (True, True)}


# ----------------------------------------------------------------------------- helpers
def shape_label(m: dict) -> str:
    return f"{m['n_layers']}x{m['d_model']}"


def wall_seconds(out: str, st: RunState) -> float | None:
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
        times = [
            float(r["time"]) for r in _records(StagePaths(os.path.join(run_dir(out, st.name), s["name"])).log) if r.get("time") is not None
        ]
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
        for r in _records(StagePaths(os.path.join(st.dir, cur)).log):
            if r.get("at") in ("before_growth", "after_growth") and "eval_loss" in r and r.get("step") == 0:
                found.setdefault(r["at"], r)
        status = st.stages[k - 1] or {}
        before, after = found.get("before_growth"), found.get("after_growth")
        out.append(
            {
                "from": prev,
                "to": cur,
                "step": status.get("step"),
                "stopped_by": status.get("stopped_by"),
                "flops": (before or after or {}).get("flops", dict(st.curve.stage_ends).get(prev)),
                "before": before["eval_loss"] if before else None,
                "after": after["eval_loss"] if after else None,
            }
        )
    return out


def speed_after_growth(st: RunState, scratch: RunState | None) -> float | None:
    """How fast the model learns after the run's last growth, against a from-scratch run of the
    final size at the same loss: (steps the scratch run took from the loss at growth to the run's
    final loss) / (steps the grown stage took). 1.0: as fast as from scratch; read on the running
    minimum of the scratch run's eval curve (the seed's longest baseline), by interpolation only
    (None where the run's losses lie outside it). The schedules differ (the grown stage decays its
    LR within the stage), so this is a reading of the learning speed, not an exact ratio."""
    if not (st.done and st.curve and st.plan and len(st.plan["stages"]) > 1 and scratch and scratch.curve):
        return None
    last = st.plan["stages"][-1]["name"]
    pts = [
        (step, loss)
        for step, loss, stg in zip(st.curve.eval_step, st.curve.eval_loss, st.curve.eval_stage)
        if stg == last and step is not None
    ]
    trs = transitions(st)
    if not pts or not trs or trs[-1]["before"] is None:
        return None
    l_g, l_end, n = trs[-1]["before"], pts[-1][1], pts[-1][0]
    env_l, env_s = [], []
    for step, loss in zip(scratch.curve.eval_step, scratch.curve.eval_loss):
        if step is not None and (not env_l or loss < env_l[-1]):
            env_l.append(loss)
            env_s.append(float(step))

    def steps_to(loss):
        from megagrow.results.savings import _interp

        return _interp(loss, env_l[::-1], env_s[::-1])

    a, b = steps_to(l_g), steps_to(l_end)
    return None if a is None or b is None or not n else (b - a) / float(n)


def _records(path: str) -> list[dict]:
    from megagrow.results.savings import _records as rec

    return rec(path)
