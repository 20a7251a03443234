"""The stage controller without Slurm: the shipped recipes, where a stage may run (`place`), what
runs next for a given run directory (`next_action`), validation before anything is launched,
the loop with a fake launcher (preemption, dependent jobs, half-written transitions), and the
`megagrow run` / `megagrow status` command lines."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, _env

from megagrow.config import Plan, load_plan
from megagrow.controller import Allocation, Controller, next_action, place, read_manifest, read_progress, status_dict, validate_plan
from megagrow.errors import UserError
from megagrow.growth.ops import operator_between

RECIPES = os.path.join(REPO, "recipes")
LOCAL2 = Allocation("local", ("localhost",), 2)


def _plan(tmp_path, **edits) -> Plan:
    """A 3-stage plan a (L1 d32) -> b (width x2, TP=2) -> c (depth x2, DP=2 ZeRO-3); fake data files."""
    prefix = tmp_path / "data"
    if not (tmp_path / "data.idx").exists():
        _dataset(str(prefix), 500)
    d = {
        "name": "p",
        "data": {"prefix": str(prefix)},
        "defaults": {"log_every": 1},
        "stages": [
            {
                "name": "a",
                "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "vocab_size": 512, "seq_len": 16},
                "layout": {"tp": 1, "dp": 2, "zero_stage": 2, "micro_batch": 2},
                "steps": 10,
            },
            {
                "name": "b",
                "grow": "width",
                "model": {"n_layers": 1, "d_model": 64, "n_heads": 4, "vocab_size": 512, "seq_len": 16},
                "layout": {"tp": 2, "dp": 1, "zero_stage": 1, "micro_batch": 2},
                "steps": 8,
            },
            {
                "name": "c",
                "grow": "depth",
                "model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "vocab_size": 512, "seq_len": 16},
                "layout": {"tp": 1, "dp": 2, "zero_stage": 3, "micro_batch": 2},
                "steps": 6,
            },
        ],
    }
    for i, e in edits.items():
        d["stages"][int(i[1:])].update(e)
    return Plan.from_dict(d)


def _dataset(prefix: str, tokens: int, vocab: int = 512) -> None:
    """A real (tiny) token dataset: one document of `tokens` tokens."""
    import numpy as np

    from megagrow.data.dataset import DatasetWriter

    with DatasetWriter(prefix, vocab) as w:
        w.add_document(np.arange(tokens, dtype=np.int64) % (vocab - 3) + 3)


def _ckpt(run, stage: str, step: int, state: str | None = "done", latest: bool = True) -> None:
    """Fake what the trainer leaves: checkpoints/<tag>/ with a file, sealed (manifest + `latest`)
    unless latest=False (a save killed before its seal), and status.json."""
    from megagrow.state.manifest import seal

    ck = os.path.join(run, stage, "checkpoints")
    tag = f"step_{step:08d}"
    os.makedirs(os.path.join(ck, tag), exist_ok=True)
    with open(os.path.join(ck, tag, "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(os.urandom(64))
    if latest:
        seal(ck, tag, {"plan": "p", "stage": stage, "step": step, "finished": state == "done"})
    if state:
        with open(os.path.join(run, stage, "status.json"), "w") as f:
            json.dump({"state": state, "step": step, "loss": 4.5, "tag": tag}, f)


# --------------------------------------------------------------------------------------
# recipes


RECIPE_FILES = ["tiny.yaml", "tiny_test.yaml", "tiny_baseline.yaml", "staged_1b.yaml", "baseline_1b.yaml"]


@pytest.mark.parametrize("name", RECIPE_FILES)
def test_recipes_load_and_chain_is_consistent(name):
    plan = load_plan(os.path.join(RECIPES, name))
    assert plan.stages[0].grow is None
    for prev, stage in zip(plan.stages, plan.stages[1:]):
        assert stage.grow, f"{stage.name}: a later stage names its growth operator"
        operator_between(stage.grow, prev.model, stage.model)  # raises if the chain is inconsistent
    for s in plan.stages:
        s.layout.check_model(s.model)
        if s.layout.ds_config:
            assert os.path.isfile(os.path.join(REPO, s.layout.ds_config))
    # one global batch and sequence length through the plan: the data stream is continuous
    assert len({(s.layout.global_batch, s.model.seq_len) for s in plan.stages}) == 1


@pytest.mark.parametrize("name", ["tiny.yaml", "tiny_test.yaml", "tiny_baseline.yaml"])
def test_cpu_recipes_fit_two_local_processes(name):
    plan = load_plan(os.path.join(RECIPES, name))
    assert all(place(s, LOCAL2).fits and place(s, LOCAL2).ntasks == 2 for s in plan.stages)


def test_gpu_recipes_fit_four_nodes_of_eight_gpus_and_change_layout():
    cluster = Allocation("slurm", tuple(f"gpu{i}" for i in range(4)), 8, max_nodes=4, job_id="1")
    for name in ("staged_1b.yaml", "baseline_1b.yaml"):
        plan = load_plan(os.path.join(RECIPES, name))
        for s in plan.stages:
            pl = place(s, cluster)
            assert pl.fits and pl.nodes == 4 and pl.tasks_per_node == 8 and 8 % s.layout.tp == 0
            assert s.layout.dtype == "bf16"
    plan = load_plan(os.path.join(RECIPES, "staged_1b.yaml"))
    params = [s.model.num_params() for s in plan.stages]
    assert 300e6 < params[1] < 400e6 and 1.2e9 < params[-1] < 1.4e9
    assert [s.grow for s in plan.stages[1:]] == ["depth", "width"]
    lay = [(s.layout.tp, s.layout.dp, s.layout.zero_stage) for s in plan.stages]
    assert lay[-1] != lay[0]


@pytest.mark.parametrize("staged,baseline", [("tiny.yaml", "tiny_baseline.yaml"), ("staged_1b.yaml", "baseline_1b.yaml")])
def test_baselines_match_their_staged_plans(staged, baseline):
    s, b = load_plan(os.path.join(RECIPES, staged)), load_plan(os.path.join(RECIPES, baseline))
    assert len(b.stages) == 1 and b.stages[0].grow is None
    final, base = s.stages[-1], b.stages[0]
    assert base.model == final.model and base.layout == final.layout
    assert (b.data, b.seed) == (s.data, s.seed)
    # the same tokens: same global batch x seq_len, as many steps as all stages together
    assert base.steps == sum(st.steps for st in s.stages)


def test_tiny_test_mirrors_tiny():
    tiny, test = load_plan(os.path.join(RECIPES, "tiny.yaml")), load_plan(os.path.join(RECIPES, "tiny_test.yaml"))
    key = lambda p: [(s.name, s.grow, s.layout.tp, s.layout.dp, s.layout.zero_stage) for s in p.stages]  # noqa: E731
    assert key(tiny) == key(test)
    assert all(s.steps <= 30 for s in test.stages)


# --------------------------------------------------------------------------------------
# placement


def test_place_local_limit(tmp_path):
    plan = _plan(tmp_path)
    assert place(plan.stages[0], LOCAL2).fits
    with pytest.raises(UserError, match="does not fit this machine"):
        place(plan.stages[0], Allocation("local", ("localhost",), 1))


def test_place_slurm_rules(tmp_path):
    plan = _plan(tmp_path)
    st = lambda tp, dp: dataclasses.replace(plan.stages[1], layout=plan.stages[1].layout.replace(tp=tp, dp=dp))  # noqa: E731
    one = Allocation("slurm", ("n1",), 8, max_nodes=4, job_id="7")
    two = Allocation("slurm", ("n1", "n2"), 8, max_nodes=4, job_id="7")
    pl = place(st(2, 2), one)  # 4 ranks on one node of 8
    assert pl.fits and (pl.nodes, pl.ntasks, pl.tasks_per_node, pl.hosts) == (1, 4, 4, ("n1",))
    pl = place(st(2, 8), two)  # 16 ranks: both nodes
    assert pl.fits and (pl.nodes, pl.tasks_per_node, pl.hosts) == (2, 8, ("n1", "n2"))
    pl = place(st(2, 8), one)  # needs 2 nodes, has 1: a dependent job, not squeezed
    assert not pl.fits and pl.nodes == 2
    with pytest.raises(UserError, match="not a whole number of nodes"):
        place(st(2, 6), two)  # 12 ranks on nodes of 8
    with pytest.raises(UserError, match="straddle"):
        place(st(4, 3), Allocation("slurm", ("n1", "n2"), 6, job_id="7"))  # TP=4 on nodes of 6
    with pytest.raises(UserError, match="more than the 4 the cluster has"):
        place(st(2, 20), two)  # 40 ranks = 5 nodes


# --------------------------------------------------------------------------------------
# what runs next


def test_next_action_walks_the_plan(tmp_path):
    plan, run = _plan(tmp_path), str(tmp_path / "run")
    act = lambda: next_action(plan, read_progress(plan, run))  # noqa: E731
    assert (act().kind, act().stage, act().resume_step) == ("train", 0, 0)
    _ckpt(run, "a", 4, "preempted")
    assert (act().kind, act().stage, act().resume_step) == ("train", 0, 4)
    _ckpt(run, "a", 6, "running")  # saved mid-stage, then killed without a signal
    assert (act().kind, act().stage, act().resume_step) == ("train", 0, 6)
    assert read_progress(plan, run)[0].state == "interrupted"
    _ckpt(run, "a", 10, "done")
    assert (act().kind, act().stage) == ("grow", 1)  # a transition, then stage b
    _ckpt(run, "b", 0, None)  # the transition wrote b's first checkpoint; training has not saved yet
    assert (act().kind, act().stage, act().resume_step) == ("train", 1, 0)
    assert read_progress(plan, run)[1].state == "ready"
    _ckpt(run, "b", 8, "done")
    assert (act().kind, act().stage) == ("grow", 2)
    _ckpt(run, "c", 6, "done")
    assert act().kind == "done"
    p = read_progress(plan, run)
    assert [x.state for x in p] == ["done"] * 3 and p[2].checkpoint == os.path.join("c", "checkpoints", "step_00000006")
    assert p[0].tokens == 10 * 4 * 16  # steps x global batch (dp 2 x micro 2) x seq_len


def test_half_written_transition_is_discarded(tmp_path):
    plan, run = _plan(tmp_path), str(tmp_path / "run")
    _ckpt(run, "a", 10, "done")
    _ckpt(run, "b", 0, None, latest=False)  # DeepSpeed files without `latest`: killed mid-transition
    os.makedirs(os.path.join(run, "b", "checkpoints.partial", "step_00000000"))
    act = next_action(plan, read_progress(plan, run))
    assert act.kind == "grow" and act.stage == 1
    assert sorted(act.discard) == sorted([os.path.join(run, "b", "checkpoints"), os.path.join(run, "b", "checkpoints.partial")])


def test_inconsistent_run_dir_is_refused(tmp_path):
    plan, run = _plan(tmp_path), str(tmp_path / "run")
    _ckpt(run, "a", 5, "preempted")
    _ckpt(run, "c", 6, "done")
    with pytest.raises(UserError, match="inconsistent: stage 'a' is not finished but c already has a checkpoint"):
        next_action(plan, read_progress(plan, run))


# --------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "edits,needle",
    [
        ({"s1": {"grow": "widen"}}, "unknown growth operator 'widen'"),
        ({"s1": {"grow": "depth"}}, "stage 1 (b): grow 'depth' from stage 'a'"),
        ({"s1": {"grow": None}}, "the model differs from stage 'a' but no `grow` operator is given"),
        ({"s0": {"grow": "width"}}, "the first stage has no previous stage to grow from"),
        ({"s2": {"layout": {"tp": 1, "dp": 4, "zero_stage": 3, "micro_batch": 2}}}, "4 processes does not fit this machine"),
        ({"s2": {"layout": {"tp": 1, "dp": 2, "ds_config": "nope.json"}}}, "ds_config 'nope.json' not found"),
    ],
)
def test_validate_plan_errors(tmp_path, edits, needle):
    plan = _plan(tmp_path, **edits)
    with pytest.raises(UserError) as e:
        validate_plan(plan, LOCAL2)
    assert needle in str(e.value)


def test_validate_plan_missing_data_and_foreign_run_dir(tmp_path):
    plan = _plan(tmp_path)
    validate_plan(plan, LOCAL2, str(tmp_path / "run"))
    with pytest.raises(UserError, match="dataset .* not found"):
        validate_plan(dataclasses.replace(plan, data=plan.data.replace(prefix=str(tmp_path / "none"))), LOCAL2)
    ctl = Controller(plan, str(tmp_path / "p.yaml"), str(tmp_path / "run"), LOCAL2)
    ctl.write_manifest("running")
    other = _plan(tmp_path, s2={"model": {"n_layers": 3, "d_model": 64, "n_heads": 4, "vocab_size": 512, "seq_len": 16}})
    with pytest.raises(UserError, match="holds a run of another plan"):
        validate_plan(other, LOCAL2, str(tmp_path / "run"))


# --------------------------------------------------------------------------------------
# the loop, with a fake launcher


class FakeStages:
    """Stands in for the ranks: each launch 'trains' the stage by writing what the trainer writes."""

    def __init__(self, plan, run, preempt_at: dict | None = None):
        self.plan, self.run, self.preempt_at, self.launched = plan, run, dict(preempt_at or {}), []

    def __call__(self, ctl, k, pl):
        s = self.plan.stages[k]
        self.launched.append((s.name, pl.ntasks, pl.hosts))
        assert not os.path.exists(os.path.join(self.run, s.name, "checkpoints.partial"))
        if s.name in self.preempt_at:
            _ckpt(self.run, s.name, self.preempt_at.pop(s.name), "preempted")
            ctl.stop = 10
            return 75
        _ckpt(self.run, s.name, s.steps, "done")
        return 0


def test_loop_runs_every_stage_then_resumes_after_preemption(tmp_path, monkeypatch):
    plan, run = _plan(tmp_path), str(tmp_path / "run")
    fake = FakeStages(plan, run, preempt_at={"b": 3})
    monkeypatch.setattr(Controller, "launch", lambda self, k, pl: fake(self, k, pl))
    assert Controller(plan, "p.yaml", run, LOCAL2).run() == 75
    m = read_manifest(run)
    assert m["state"] == "preempted" and [s["state"] for s in status_dict(run)["stages"]] == ["done", "preempted", "pending"]
    assert "stages" not in m  # derived from the checkpoints, not stored
    assert [(e["event"], e.get("rc")) for e in m["events"]] == [("launch", None), ("exit", 0), ("launch", None), ("exit", 75)]
    assert Controller(plan, "p.yaml", run, LOCAL2).run() == 0  # the "requeued" controller
    assert [x[0] for x in fake.launched] == ["a", "b", "b", "c"]
    m = read_manifest(run)
    assert m["state"] == "done" and m["launches"] == 4
    assert [e["from_step"] for e in m["events"] if e["event"] == "launch"] == [0, 0, 3, 0]
    d = status_dict(run)
    assert [s["state"] for s in d["stages"]] == ["done"] * 3 and d["tokens"] == (10 * 4 + 8 * 2 + 6 * 4) * 16


def test_loop_submits_a_dependent_job_for_more_nodes(tmp_path, monkeypatch):
    plan, run = _plan(tmp_path), str(tmp_path / "run")
    plan = dataclasses.replace(
        plan, stages=plan.stages[:1] + (dataclasses.replace(plan.stages[1], layout=plan.stages[1].layout.replace(tp=2, dp=2)),)
    )
    alloc = Allocation("slurm", ("node1",), 2, max_nodes=2, job_id="41", script="/x/job.sh")
    fake = FakeStages(plan, run)
    monkeypatch.setattr(Controller, "launch", lambda self, k, pl: fake(self, k, pl))
    submitted = []
    monkeypatch.setattr(Controller, "submit_dependent", lambda self, k, pl: submitted.append((k, pl.nodes)) or "42")
    assert Controller(plan, "p.yaml", run, alloc).run() == 0
    assert fake.launched == [("a", 2, ("node1",))] and submitted == [(1, 2)]
    m = read_manifest(run)
    assert m["state"] == "handed_off" and m["current"]["next_job"] == "42"
    ev = m["events"][-1]
    assert ev["event"] == "dependent_job" and ev["nodes"] == 2 and ev["job_id"] == "41"
    # the dependent job (2 nodes) runs it
    alloc2 = Allocation("slurm", ("node1", "node2"), 2, max_nodes=2, job_id="42")
    assert Controller(plan, "p.yaml", run, alloc2).run() == 0
    assert fake.launched[-1] == ("b", 4, ("node1", "node2"))


def test_loop_discards_half_written_transition_and_stops_on_failure(tmp_path, monkeypatch):
    plan, run = _plan(tmp_path), str(tmp_path / "run")
    _ckpt(run, "a", 10, "done")
    os.makedirs(os.path.join(run, "b", "checkpoints.partial", "step_00000000"))
    os.makedirs(os.path.join(run, "b", "checkpoints", "step_00000000"))
    calls = []

    def failing(self, k, pl):
        calls.append(k)
        assert not os.path.exists(os.path.join(run, "b", "checkpoints"))  # discarded before the launch
        return 1

    monkeypatch.setattr(Controller, "launch", failing)
    assert Controller(plan, "p.yaml", run, LOCAL2).run() == 1
    assert calls == [1, 1, 1]  # reliability.retries (default 2): launched again twice before the run is declared failed
    m = read_manifest(run)
    assert m["state"] == "failed"
    assert [e["event"] for e in m["events"]].count("retry") == 2
    assert status_dict(run)["stages"][1]["state"] == "failed"


def test_loop_stops_when_a_stage_makes_no_progress(tmp_path, monkeypatch):
    plan, run = _plan(tmp_path), str(tmp_path / "run")
    monkeypatch.setattr(Controller, "launch", lambda self, k, pl: 0)  # exits 0 but writes nothing
    assert Controller(plan, "p.yaml", run, LOCAL2).run() == 1
    assert read_manifest(run)["state"] == "failed"


# --------------------------------------------------------------------------------------
# command lines


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "megagrow.cli", *args], capture_output=True, text=True, env=_env(), cwd=cwd, timeout=300)


def test_run_bad_input_is_one_line_and_launches_nothing(tmp_path):
    with open(os.path.join(RECIPES, "tiny_test.yaml")) as f:
        d = yaml.safe_load(f)
    d["stages"][2]["grow"] = "deepen"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(d))
    _dataset(str(tmp_path / "data"), 500)
    r = _cli("run", str(bad), "--run-dir", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--max-procs", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: stage 2 (deep)")
    assert "unknown growth operator 'deepen'" in r.stderr
    assert not os.path.exists(tmp_path / "run")
    r = _cli(
        "run",
        os.path.join(RECIPES, "tiny_test.yaml"),
        "--run-dir",
        str(tmp_path / "run"),
        "--data",
        str(tmp_path / "data"),
        "--max-procs",
        "1",
    )
    assert r.returncode == 2 and "does not fit this machine (1 allowed locally" in r.stderr
    assert not os.path.exists(tmp_path / "run")


def test_run_dry_run_and_status(tmp_path):
    _dataset(str(tmp_path / "data"), 500)
    run = str(tmp_path / "run")
    r = _cli(
        "run", os.path.join(RECIPES, "tiny_test.yaml"), "--run-dir", run, "--data", str(tmp_path / "data"), "--max-procs", "2", "--dry-run"
    )
    assert r.returncode == 0, r.stderr
    assert "next: train small 0/16" in r.stdout and "tp 2 x dp 1 zero 1" in r.stdout
    r = _cli("status", run)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "manifest.json" in r.stderr
    plan = load_plan(os.path.join(RECIPES, "tiny_test.yaml"))
    Controller(plan, os.path.join(RECIPES, "tiny_test.yaml"), run, LOCAL2).write_manifest("running", {"stage_index": 1, "action": "grow"})
    _ckpt(run, "small", 16, "done")
    r = _cli("status", run)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split()[:5] == ["STAGE", "STATE", "STEP", "TOKENS", "LOSS"]
    assert lines[2].split()[:4] == ["small", "done", "16/16", "2.0k"] and "small/checkpoints/step_00000016" in lines[2]
    assert lines[3].split()[:3] == ["wide", "growing", "0/12"] and "tp2 dp1 zero1" in lines[3]
    assert lines[4].split()[:3] == ["deep", "pending", "0/12"]
    r = _cli("status", run, "--json")
    d = json.loads(r.stdout)
    assert [s["state"] for s in d["stages"]] == ["done", "growing", "pending"] and d["stages"][0]["loss"] == 4.5


def test_one_controller_per_run_dir(tmp_path):
    from megagrow.controller import lock_run_dir

    run = str(tmp_path / "run")
    held = lock_run_dir(run)
    with pytest.raises(UserError, match="another `megagrow run` is working on"):
        lock_run_dir(run)
    held.close()
    lock_run_dir(run).close()


def test_stage_ended_early_or_saved_at_its_last_step_is_done(tmp_path):
    plan, run = _plan(tmp_path), str(tmp_path / "run")
    _ckpt(run, "a", 10, "preempted")  # a signal at the very last step: saved as preempted, nothing left to train
    _ckpt(run, "b", 3, "done")
    with open(os.path.join(run, "b", "status.json"), "w") as f:
        json.dump({"state": "done", "step": 3, "stopped_by": "slope"}, f)  # the slope rule ended b at 3 of 8
    p = read_progress(plan, run)
    assert [x.state for x in p] == ["done", "done", "pending"]
    assert (next_action(plan, p).kind, next_action(plan, p).stage) == ("grow", 2)


def test_status_shows_how_long_the_running_stage_has_made_no_progress(tmp_path, monkeypatch):
    """While a stage runs, `megagrow status` reads its heartbeat's age (rank 0 touches it as steps
    finish): a heartbeat 42 s old reads as progress_age_s 42-60; a stage not running has none."""
    import time

    from megagrow.paths import RunPaths

    plan, run = _plan(tmp_path), str(tmp_path / "run")
    seen = []

    def launching(self, k, pl):
        hb = RunPaths(run).stage(plan.stages[k].name).heartbeat
        os.makedirs(os.path.dirname(hb), exist_ok=True)
        open(hb, "a").close()
        t = time.time() - 42
        os.utime(hb, (t, t))
        seen.append(status_dict(run)["stages"])
        return 2  # refuses its input: not retried, the loop ends

    monkeypatch.setattr(Controller, "launch", launching)
    assert Controller(plan, "p.yaml", run, LOCAL2).run() == 2
    st = seen[0]
    assert st[0]["state"] == "running" and 42 <= st[0]["progress_age_s"] < 60, st[0]
    assert "progress_age_s" not in st[1]


# --------------------------------------------------------------------------------------
# one stage-state record: the sealed checkpoints decide, disagreements are named


OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _sealed(run, stage: str, step: int, finished: bool) -> str:
    """A sealed tag with a module file and an optimizer file, as a training save leaves it."""
    from megagrow.state.manifest import seal

    ck = os.path.join(run, stage, "checkpoints")
    tag = f"step_{step:08d}"
    os.makedirs(os.path.join(ck, tag), exist_ok=True)
    for name, size in (("mp_rank_00_model_states.pt", 64), (OPTIM, 4096)):
        with open(os.path.join(ck, tag, name), "wb") as f:
            f.write(os.urandom(size))
    seal(ck, tag, {"plan": "p", "stage": stage, "step": step, "finished": finished})
    with open(os.path.join(run, stage, "status.json"), "w") as f:
        json.dump({"state": "done" if finished else "running", "step": step, "loss": 4.5, "tag": tag}, f)
    return os.path.join(ck, tag)


def test_truncated_final_optimizer_file_makes_the_stage_torn_and_run_resumes_from_the_older_checkpoint(tmp_path, monkeypatch):
    """Property: a finished stage whose final optimizer file is truncated after its seal (status.json
    and RUN/manifest.json still say done) is "torn", not done: `megagrow status` shows it at the older
    complete checkpoint's step with one note naming the file and where it goes on from, and `megagrow
    run` says so and resumes it from that checkpoint (step 4), not from step 0."""
    import io

    plan, run = _plan(tmp_path), str(tmp_path / "run")
    _sealed(run, "a", 4, False)
    final = _sealed(run, "a", 10, True)
    ctl = Controller(plan, "p.yaml", run, LOCAL2)
    ctl.write_manifest("done")
    with open(os.path.join(final, OPTIM), "r+b") as f:
        f.truncate(100)
    d = status_dict(run)
    a = d["stages"][0]
    assert (a["state"], a["step"], a["checkpoint"]) == ("torn", 4, os.path.join("a", "checkpoints", "step_00000004"))
    assert d["state"] == "torn" and len([n for n in d["notes"] if n.startswith("a: torn: ")]) == 1
    assert f"{OPTIM}: size 100 != 4096 recorded" in a["note"] and "step_00000004 (step 4/10)" in a["note"]
    r = _cli("status", run)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[4:6] == ["state", "torn"] and lines[2].split()[:3] == ["a", "torn", "4/10"]
    assert sum(line.startswith("note: a: torn: status.json says done at step 10") for line in lines) == 1
    act = next_action(plan, read_progress(plan, run))
    assert (act.kind, act.stage, act.resume_step) == ("train", 0, 4)

    out, launched = io.StringIO(), []

    def launch(self, k, pl):
        launched.append((plan.stages[k].name, read_progress(plan, run)[k].step))
        return 2  # stop after the first launch

    monkeypatch.setattr(Controller, "launch", launch)
    Controller(plan, "p.yaml", run, LOCAL2, out=out).run()
    said = out.getvalue()
    assert launched == [("a", 4)]
    assert said.count("stage a is torn: status.json says done at step 10") == 1 and "resume a at step 4/10" in said


def test_torn_stage_without_an_older_checkpoint_says_it_starts_again(tmp_path):
    """Property: when the torn final checkpoint was the only one (keep_last 1), the stage is torn at
    step 0 and the note says it trains again from step 0; a later stage that already grew from it is
    not held up by it (the torn stage keeps its note)."""
    plan, run = _plan(tmp_path), str(tmp_path / "run")
    final = _sealed(run, "a", 10, True)
    with open(os.path.join(final, OPTIM), "r+b") as f:
        f.truncate(10)
    p = read_progress(plan, run)
    assert p[0].state == "torn" and p[0].step == 0 and p[0].note.endswith("trains it again from step 0")
    assert (next_action(plan, p).kind, next_action(plan, p).stage) == ("train", 0)
    _ckpt(run, "b", 0, None)  # b was grown from a before the damage
    p = read_progress(plan, run)
    assert p[0].state == "torn" and (next_action(plan, p).kind, next_action(plan, p).stage) == ("train", 1)


# --------------------------------------------------------------------------------------
# cluster details: hosts of a retry, MASTER_PORT, the watchdog's clock, who marks a failure


def test_a_retry_runs_on_other_hosts_where_the_allocation_has_them(tmp_path, monkeypatch):
    """Property: under Slurm, a failed launch's retry is placed on the allocation's other hosts when it
    has enough of them (4 nodes, a 2-node stage: n1,n2 then n3,n4), and on the same hosts only when it
    has no others (a 4-node stage)."""
    plan, run = _plan(tmp_path), str(tmp_path / "run")
    plan = dataclasses.replace(plan, stages=(dataclasses.replace(plan.stages[0], layout=plan.stages[0].layout.replace(dp=4)),))
    alloc = Allocation("slurm", ("n1", "n2", "n3", "n4"), 2, max_nodes=4, job_id="7")
    hosts = []
    monkeypatch.setattr(Controller, "launch", lambda self, k, pl: hosts.append(pl.hosts) or 1)
    assert Controller(plan, "p.yaml", run, alloc, retries=1).run() == 1
    assert hosts == [("n1", "n2"), ("n3", "n4")]
    assert place(plan.stages[0], alloc, avoid=("n1", "n2", "n3")).hosts == ("n4", "n1")
    whole = Allocation("slurm", ("n1", "n2"), 2, max_nodes=2, job_id="7")
    assert place(plan.stages[0], whole, avoid=("n1", "n2")).hosts == ("n1", "n2")


def test_master_port_differs_across_jobs_users_and_requeued_launches(tmp_path, monkeypatch):
    """Property: derived MASTER_PORTs do not repeat for jobs whose ids agree mod 4000, for two users of
    one node, or for consecutive launches of a run, and stay below the ephemeral range; the launch
    counter they use is kept in RUN/manifest.json, so a requeued controller goes on counting."""
    from megagrow.controller import master_port

    assert master_port("17", 1, 1000) != master_port("4017", 1, 1000)
    assert master_port("17", 1, 1000) != master_port("17", 1, 1001)
    assert len({master_port("17", n, 1000) for n in range(1, 50)}) > 45
    assert all(20000 <= master_port(str(j), n, 1000) < 32000 for j in range(50) for n in range(5))
    plan, run = _plan(tmp_path), str(tmp_path / "run")
    fake = FakeStages(plan, run, preempt_at={"b": 3})
    seen = []
    monkeypatch.setattr(Controller, "launch", lambda self, k, pl: seen.append(self.launches) or fake(self, k, pl))
    assert Controller(plan, "p.yaml", run, LOCAL2).run() == 75
    assert Controller(plan, "p.yaml", run, LOCAL2).run() == 0  # the requeued job
    assert seen == [1, 2, 3, 4] and read_manifest(run)["launches"] == 4


def test_hang_watchdog_reads_file_system_time_not_the_controller_clock(tmp_path, monkeypatch):
    """Property: a stage whose rank keeps its heartbeat fresh is not declared hung when the controller's
    clock runs 100 s ahead of rank 0's (ages are file system mtimes against file system mtimes); one
    whose heartbeat stops is still declared hung."""
    import time as _time

    from megagrow import procs

    hb = str(tmp_path / "heartbeat")
    beat = [sys.executable, "-c", f"import os,time\nfor _ in range(24):\n    open({hb!r},'a').close(); os.utime({hb!r}); time.sleep(0.25)"]
    real = _time.time
    monkeypatch.setattr(procs.time, "time", lambda: real() + 100.0)
    open(hb, "a").close()  # fresh when the wait starts (the child's interpreter may take a while to start)
    os.utime(hb)
    res = procs.wait_ranks([subprocess.Popen(beat)], grace_s=2, poll_s=0.05, heartbeat=hb, hang_s=4.0)
    assert res.rc == 0 and res.hung_s is None, res
    stuck = [sys.executable, "-c", "import time; time.sleep(60)"]
    res = procs.wait_ranks([subprocess.Popen(stuck)], grace_s=2, poll_s=0.05, heartbeat=hb, hang_s=4.0)
    assert res.hung_s is not None and res.hung_s < 10, res


@pytest.mark.parametrize(
    "env,writes",
    [({"SLURM_PROCID": "1"}, False), ({"SLURM_PROCID": "0"}, True), ({"RANK": "3"}, False), ({"RANK": "0", "SLURM_PROCID": "0"}, True)],
)
def test_only_the_launchers_rank_0_marks_a_stage_failed(tmp_path, monkeypatch, env, writes):
    """Property: when a stage fails before torch.distributed starts, only global rank 0 as its launcher
    numbers it (RANK under torchrun, SLURM_PROCID under srun) rewrites status.json; under srun no
    other rank does (RANK is unset there)."""
    from megagrow.cli import _mark_failed

    for k in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    run = str(tmp_path / "run")
    os.makedirs(os.path.join(run, "a"))
    path = os.path.join(run, "a", "status.json")
    with open(path, "w") as f:
        json.dump({"state": "running", "step": 2}, f)
    _mark_failed(run, "a", "boom")
    assert (json.load(open(path))["state"] == "failed") is writes


def test_overrides_go_to_every_stage_launch_the_manifest_and_a_dependent_job(tmp_path, monkeypatch):
    """`megagrow run --set ...`: each stage's command line carries the same `--set KEY=VALUE` pairs in
    order, RUN/manifest.json lists them, and a dependent Slurm job gets them in MEGAGROW_RUN_ARGS
    (slurm/env.sh passes that to its `megagrow run`), after the arguments it already had."""
    plan, run = _plan(tmp_path), str(tmp_path / "run")
    sets = ("stages.b.optim.lr=2e-3", "reliability.keep_last=3")
    ctl = Controller(plan, "p.yaml", run, LOCAL2, overrides=sets)
    cmd = ctl.train_cmd(1)
    assert cmd[cmd.index("--set") :] == ["--set", sets[0], "--set", sets[1]]
    assert ctl.write_manifest("running")["overrides"] == list(sets) and read_manifest(run)["overrides"] == list(sets)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\nprintf '%s' \"$MEGAGROW_RUN_ARGS\" > {tmp_path / 'args'}\necho 99\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MEGAGROW_RUN_ARGS", "--grace 30")
    alloc = Allocation("slurm", ("n1",), 2, max_nodes=4, job_id="7", script=str(tmp_path / "job.sh"))
    job = Controller(plan, "p.yaml", run, alloc, overrides=sets).submit_dependent(1, place(plan.stages[1], alloc))
    assert job == "99"
    assert (tmp_path / "args").read_text() == "--grace 30 --set=stages.b.optim.lr=2e-3 --set=reliability.keep_last=3"
