"""The stage controller on a real Slurm cluster (slurmctld + 2 slurmd as fake nodes on this
machine, started by tests/slurm/local_slurm.sh): sbatch slurm/tiny_cpu.sh end to end, preemption
mid-stage and during a transition (requeue, resume, no step lost or repeated), a stage spread
over 2 nodes through a dependent job, and bad input refused before anything is launched.

Needs root (slurmd, munged) and apt-get or an installed Slurm; skipped with the reason
otherwise, except under .ci/run (MEGAGROW_REQUIRE_SLURM=1), where a cluster that cannot start
is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO

HERE = os.path.dirname(os.path.abspath(__file__))
SLURM_DIR = os.environ.get("MEGAGROW_TEST_SLURM_DIR", "/tmp/megagrow-slurm-tests")
TINY = os.path.join(REPO, "recipes", "tiny_test.yaml")
REQUIRE = os.environ.get("MEGAGROW_REQUIRE_SLURM") == "1"


def _skip_or_fail(reason: str):
    if REQUIRE:
        pytest.fail(f"MEGAGROW_REQUIRE_SLURM=1 but: {reason}")
    pytest.skip(reason)


def _alive(pidfile: str, comm: str) -> bool:
    try:
        pid = open(pidfile).read().strip()
        return open(f"/proc/{pid}/comm").read().strip() == comm
    except OSError:
        return False


@pytest.fixture(scope="session")
def slurm():
    """A 2-node local cluster for the session; stopped at the end if this session started it."""
    if os.geteuid() != 0:
        _skip_or_fail("the local Slurm cluster needs root (slurmd and munged run as root)")
    have = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "srun", "munged"))
    if not have and not shutil.which("apt-get"):
        _skip_or_fail("Slurm is not installed and apt-get is not available to install it")
    env = dict(
        os.environ,
        SLURM_LOCAL_DIR=SLURM_DIR,
        SLURM_LOCAL_NODES="2",
        SLURM_LOCAL_CPUS="2",
        SLURM_LOCAL_CTLD_PORT="6917",
        SLURM_LOCAL_SLURMD_PORT="6918",
        SLURM_LOCAL_CRED_EXPIRE="5",
        SLURM_LOCAL_PROCTRACK="pgid",
    )
    was_up = _alive(os.path.join(SLURM_DIR, "run", "slurmctld.pid"), "slurmctld")
    r = subprocess.run(["bash", os.path.join(HERE, "local_slurm.sh")], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        _skip_or_fail(
            f"local Slurm cluster did not start (tests/slurm/local_slurm.sh exit {r.returncode}): "
            f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}"
        )
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = os.path.join(SLURM_DIR, "etc", "slurm.conf")
    yield SLURM_DIR
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    if not was_up:
        subprocess.run(["bash", os.path.join(HERE, "stop_local_slurm.sh")], env=env, capture_output=True, timeout=120)


# --------------------------------------------------------------------------------------
# helpers


def _job_env(**kw) -> dict:
    env = dict(os.environ)
    for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        env.pop(k)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # the venv's python in the job
    if sys.prefix != sys.base_prefix:
        env["MEGAGROW_VENV"] = sys.prefix
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in kw.items()})
    return env


def sbatch(out_dir, *args, script="slurm/tiny_cpu.sh", **env) -> str:
    """Submit from the repository root (the job's SLURM_SUBMIT_DIR); output in out_dir/job-<id>.out;
    dependent jobs the controller submits write there too (MEGAGROW_SBATCH_ARGS)."""
    pattern = os.path.join(str(out_dir), "job-%j.out")
    env.setdefault("MEGAGROW_SBATCH_ARGS", f"--output={pattern}")
    r = subprocess.run(
        ["sbatch", "--parsable", f"--output={pattern}", *args, script],
        cwd=REPO,
        env=_job_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job_info(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    info = {}
    for tok in out.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            info.setdefault(k, v)
    return info


def in_queue(job: str) -> bool:
    r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return r.returncode == 0 and bool(r.stdout.strip())


def wait_job(job: str, timeout: float = 240) -> dict:
    """Poll squeue (sbatch --wait polls slowly) until the job left the queue; requeues stay in it."""
    end = time.time() + timeout
    while in_queue(job):
        if time.time() > end:
            subprocess.run(["scancel", job])
            pytest.fail(f"job {job} still in the queue after {timeout} s: {job_info(job)}")
        time.sleep(0.5)
    return job_info(job)


def output(out_dir, job: str) -> str:
    try:
        with open(os.path.join(str(out_dir), f"job-{job}.out")) as f:
            return f.read()
    except OSError:
        return ""


def wait_for(cond, what: str, job: str, out_dir, timeout: float = 180, every: float = 0.1):
    end = time.time() + timeout
    while not cond():
        if time.time() > end or not in_queue(job):
            pytest.fail(f"gave up waiting for {what} (job {job} {job_info(job).get('JobState')}):\n{output(out_dir, job)[-4000:]}")
        time.sleep(every)


def log_steps(run: str, stage: str) -> list[int]:
    path = os.path.join(run, stage, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r["step"] for r in (json.loads(line) for line in f if line.endswith("\n")) if "loss" in r]  # training records


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def ds_layout(run: str, stage: str) -> tuple[int, int, list[str]]:
    """(mp_world_size, dp_world_size) as DeepSpeed recorded them in the stage's final checkpoint, and its files."""
    import torch

    ckpt = os.path.join(run, stage, "checkpoints")
    tag = open(os.path.join(ckpt, "latest")).read().strip()
    files = sorted(os.listdir(os.path.join(ckpt, tag)))
    ms = next(f for f in files if f.endswith("model_states.pt") and "mp_rank_00" in f)
    sd = torch.load(os.path.join(ckpt, tag, ms), map_location="cpu", weights_only=False)
    return sd["mp_world_size"], sd["dp_world_size"], files


def write_plan(path, base: str = TINY, keep: int | None = None, **stage_edits) -> str:
    """A variant of a recipe: the first `keep` stages, with per-stage edits {name: {key: value}}."""
    with open(base) as f:
        d = yaml.safe_load(f)
    d["name"] = os.path.splitext(os.path.basename(str(path)))[0]
    if keep:
        d["stages"] = d["stages"][:keep]
    for s in d["stages"]:
        for k, v in stage_edits.get(s["name"], {}).items():
            if isinstance(v, dict):
                s.setdefault(k, {}).update(v)
            else:
                s[k] = v
    with open(path, "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)
    return str(path)


# --------------------------------------------------------------------------------------
# (a) the tiny plan end to end


def test_tiny_plan_end_to_end(slurm, tmp_path, data_prefix):
    run = str(tmp_path / "run")
    job = sbatch(tmp_path, MEGAGROW_PLAN=TINY, MEGAGROW_DATA=data_prefix, MEGAGROW_RUN_DIR=run)
    info = wait_job(job)
    out = output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-4000:]

    with open(TINY) as f:
        plan = yaml.safe_load(f)
    names = [s["name"] for s in plan["stages"]]
    layouts = []
    for s in plan["stages"]:
        st = read_json(os.path.join(run, s["name"], "status.json"))
        assert st["state"] == "done" and st["step"] == s["steps"], st
        assert log_steps(run, s["name"]) == list(range(1, s["steps"] + 1))
        for k in ("tp", "dp", "zero_stage"):
            assert st["layout"][k] == s["layout"][k]
        layouts.append((st["layout"]["tp"], st["layout"]["dp"], st["layout"]["zero_stage"]))
    # every transition changed the layout, as status.json and DeepSpeed's own checkpoint metadata say
    assert all(a != b for a, b in zip(layouts, layouts[1:])), layouts
    got = [ds_layout(run, n)[:2] for n in names]
    assert got == [(tp, dp) for tp, dp, _ in layouts], got
    assert any("mp_rank_01" in f for f in ds_layout(run, "wide")[2])  # TP=2 wrote a second model-parallel shard
    # every transition ran once, in the job
    for a, b in zip(names, names[1:]):
        assert out.count(f"transition {a} -> {b} ({plan['stages'][names.index(b)]['grow']}): start") == 1, out[-4000:]
    assert f"stage {names[-1]} at step {plan['stages'][-1]['steps']}: checkpoint" in out
    assert "rank 0/2 on node" in out and "rank 1/2 on node" in out
    # the manifest and `megagrow status`
    m = read_json(os.path.join(run, "manifest.json"))
    assert m["state"] == "done" and "stages" not in m  # each stage's state is derived from its checkpoints
    r = subprocess.run([sys.executable, "-m", "megagrow.cli", "status", run, "--json"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["state"] == "done" and all(s["checkpoint"] for s in st["stages"])
    assert [s["state"] for s in st["stages"]] == ["done"] * len(names)


# --------------------------------------------------------------------------------------
# (b) preemption mid-stage and during a transition


def test_preempt_mid_stage_and_during_transition(slurm, tmp_path, data_prefix):
    """scancel --batch --signal=USR1 twice: in the middle of stage `small`, then while stage
    `wide` grows out of it. Each time the ranks save, the job requeues itself, the restarted job
    (SLURM_RESTART_COUNT 1, 2) resumes; in the end each stage logged steps 1..N exactly once.
    A half-written transition output planted while the job waits to restart is discarded."""
    steps = 200
    plan = write_plan(tmp_path / "preempt.yaml", keep=2, small={"steps": steps})
    run = str(tmp_path / "run")
    job = sbatch(tmp_path, MEGAGROW_PLAN=plan, MEGAGROW_DATA=data_prefix, MEGAGROW_RUN_DIR=run)

    # 1. mid-stage
    wait_for(lambda: len(log_steps(run, "small")) >= 10, "stage small to train", job, tmp_path)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    wait_for(lambda: "restart 1 " in output(tmp_path, job) or job_info(job).get("Restarts") == "1", "the job to be requeued", job, tmp_path)
    st = read_json(os.path.join(run, "small", "status.json"))
    s1 = st["step"]
    assert st["state"] == "preempted" and 10 <= s1 < steps, st
    # a transition killed midway (no signal, no save) leaves output without `latest`: plant some
    for junk in ("checkpoints", "checkpoints.partial"):
        os.makedirs(os.path.join(run, "wide", junk, "step_00000000"))
        open(os.path.join(run, "wide", junk, "step_00000000", "mp_rank_00_model_states.pt"), "w").close()

    # 2. during the transition small -> wide (after it started, before wide's first step)
    wait_for(
        lambda: "transition small -> wide (width): start" in output(tmp_path, job), "the transition to start", job, tmp_path, every=0.05
    )
    assert log_steps(run, "wide") == []
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)

    info = wait_job(job)
    out = output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-5000:]
    assert info["Restarts"] == "2", info
    for n in (0, 1, 2):
        assert f"restart {n} " in out
    assert out.count("scontrol requeue") == 2, out[-5000:]
    assert "discarding a half-written transition output" in out

    # no step lost or repeated, in either stage
    assert log_steps(run, "small") == list(range(1, steps + 1))
    assert log_steps(run, "wide") == list(range(1, 13))
    ev = read_json(os.path.join(run, "manifest.json"))["events"]
    exits = [(e["stage"], e["rc"], e["step"], e["restart"]) for e in ev if e["event"] == "exit"]
    assert exits[0] == ("small", 75, s1, 0), exits
    assert exits[1] == ("small", 0, steps, 1), exits
    assert exits[2][:3] == ("wide", 75, 0) and exits[2][3] == 1, exits  # saved right after growing
    assert exits[3] == ("wide", 0, 12, 2), exits
    assert out.count("transition small -> wide (width): start") == 1  # the grown checkpoint was kept, not grown twice
    assert f"resumed stage small at step {s1}" in out and "resumed stage wide at step 0" in out


# --------------------------------------------------------------------------------------
# (c) a stage across 2 nodes, reached through a dependent job


def test_two_nodes_via_dependent_job(slurm, tmp_path, data_prefix):
    """The job gets 1 node x 1 task: stage `one` (1 rank) runs there; stage `two` (DP=2 at 1 rank
    per node) needs 2 nodes, so the controller submits itself again with --nodes=2 and
    --dependency=afterok; that job runs `two` across node1 and node2."""
    plan = write_plan(
        tmp_path / "twonode.yaml",
        keep=2,
        small={"name": "one", "steps": 8, "layout": {"dp": 1, "zero_stage": 1, "ds_config": None}},
        wide={"name": "two", "steps": 8, "layout": {"tp": 1, "dp": 2, "zero_stage": 2, "grad_accum": 1}},
    )
    run = str(tmp_path / "run")
    job = sbatch(tmp_path, "--nodes=1", "--ntasks-per-node=1", MEGAGROW_PLAN=plan, MEGAGROW_DATA=data_prefix, MEGAGROW_RUN_DIR=run)
    info = wait_job(job)
    out = output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-4000:]
    m = read_json(os.path.join(run, "manifest.json"))
    assert m["state"] in ("handed_off", "running", "done"), m["state"]
    dep = next(e for e in m["events"] if e["event"] == "dependent_job")
    nxt = dep["next_job"]
    assert dep["nodes"] == 2 and dep["job_id"] == job
    info2 = wait_job(nxt)
    out2 = output(tmp_path, nxt)
    assert info2["JobState"] == "COMPLETED" and info2["ExitCode"] == "0:0", out2[-4000:]
    assert info2["NumNodes"] == "2" and info2["Dependency"] in ("(null)", f"afterok:{job}(sucessful)", f"afterok:{job}(successful)")
    assert "rank 0/2 on node1" in out2 and "rank 1/2 on node2" in out2, out2[-4000:]
    assert "rank 0/1 on node" in out and "needs 2 nodes" in out
    assert read_json(os.path.join(run, "manifest.json"))["state"] == "done"
    assert log_steps(run, "one") == list(range(1, 9)) and log_steps(run, "two") == list(range(1, 9))
    assert ds_layout(run, "two")[:2] == (1, 2)


# --------------------------------------------------------------------------------------
# (d) bad input: one error line, exit 2, nothing launched


def test_bad_input_refused_before_launch(slurm, tmp_path, data_prefix):
    cases = {
        # 3 ranks on nodes of 2 ranks: not a whole number of nodes
        "fit": write_plan(tmp_path / "fit.yaml", keep=1, small={"layout": {"dp": 3}}),
        "operator": write_plan(tmp_path / "operator.yaml", keep=2, wide={"grow": "widen"}),
        "chain": write_plan(tmp_path / "chain.yaml", wide={"grow": "depth"}),  # d_model changes: not a depth growth
    }
    needles = {
        "fit": "is not a whole number of nodes",
        "operator": "unknown growth operator 'widen'",
        "chain": "stage 1 (wide): grow 'depth' from stage 'small'",
    }
    jobs = {k: sbatch(tmp_path, MEGAGROW_PLAN=p, MEGAGROW_DATA=data_prefix, MEGAGROW_RUN_DIR=str(tmp_path / k)) for k, p in cases.items()}
    for k, job in jobs.items():
        info = wait_job(job, timeout=120)
        out = output(tmp_path, job)
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert info["ExitCode"] == "2:0" and info["JobState"] == "FAILED", (k, info, out)
        assert len(errors) == 1 and needles[k] in errors[0], (k, out)
        assert "Traceback" not in out and "srun on" not in out and "scontrol requeue" not in out
        assert not os.path.exists(tmp_path / k)  # no run directory, no manifest: nothing was launched
