"""`megagrow run` under faults, end to end (real processes): a rank killed mid-stage is retried from
the newest complete checkpoint and the run finishes; the ranks die with a controller killed by
SIGKILL; SIGTERM right after a launch (before the ranks could install handlers) still ends in a save
and exit 75."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from conftest import REPO, _env
from megagrow.controller import status_dict

PLAN = {"name": "cf", "seed": 4, "defaults": {"optim": {"warmup_steps": 1}, "log_every": 1, "save_every": 2},
        "reliability": {"collective_timeout_s": 30, "retries": 1},
        "stages": [{"name": "a", "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "vocab_size": 512, "seq_len": 16},
                    "layout": {"tp": 1, "dp": 2, "zero_stage": 2, "micro_batch": 2}, "steps": 6}]}


def _plan(tmp_path, data, steps=6):
    d = json.loads(json.dumps(PLAN))
    d["data"] = {"prefix": data}
    d["stages"][0]["steps"] = steps
    p = tmp_path / f"plan{steps}.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def _run(plan, run, env=None, **kw):
    e = _env()
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "megagrow.cli", "run", plan, "--run-dir", str(run), "--max-procs", "2",
                             "--grace", "20"], env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_killed_rank_is_retried_and_the_run_finishes(data_prefix, tmp_path):
    """Rank 1 is killed (SIGKILL) after step 3, once: the survivor stops with one line, the controller names
    rank 1 as the failure, retries from the newest complete checkpoint (step 2), and the plan finishes
    (exit 0) with the stage at 6/6."""
    run = tmp_path / "run"
    fault = json.dumps({"point": "step", "rank": 1, "step": 3, "once": str(tmp_path / "fired")})
    p = _run(_plan(tmp_path, data_prefix), run, env={"MEGAGROW_FAULT": fault})
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    assert "rank 1 failed first (killed by SIGKILL)" in out and "retrying from its newest complete checkpoint (step 2" in out, out
    m = json.load(open(run / "manifest.json"))
    assert m["state"] == "done" and status_dict(str(run))["stages"][0]["step"] == 6
    retry = [e for e in m["events"] if e["event"] == "retry"]
    assert len(retry) == 1 and retry[0]["rc"] == 137 and "rank 1" in retry[0]["failure"]
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] and "Traceback" not in err, err[-3000:]


def test_ranks_die_with_the_controller_and_early_sigterm_saves(data_prefix, tmp_path):
    """(1) kill -9 of `megagrow run` while its ranks train: every rank is gone within 10 s (parent-death
    signal), so a new `megagrow run` never races an orphan. (2) SIGTERM to `megagrow run` as soon as its
    ranks exist (they are still importing torch): the ranks save at their first step boundary and the
    controller exits 75, the stage 'preempted' (not a failure)."""
    plan = _plan(tmp_path, data_prefix, steps=400)
    run = tmp_path / "run"
    p = _run(plan, run)
    log = run / "a" / "log.jsonl"
    t0 = time.time()
    while not (log.exists() and log.stat().st_size > 0):
        assert p.poll() is None and time.time() - t0 < 600, p.communicate()[1][-3000:] if p.poll() is not None else "slow"
        time.sleep(0.2)
    ranks = _children(p.pid)
    assert len(ranks) == 2
    p.kill()
    p.wait()
    t0 = time.time()
    while any(_alive(r) for r in ranks) and time.time() - t0 < 10:
        time.sleep(0.1)
    assert not any(_alive(r) for r in ranks), "ranks outlived their controller"

    run2 = tmp_path / "run2"
    p = _run(plan, run2)
    t0 = time.time()
    while len(_children(p.pid)) < 2:
        assert p.poll() is None and time.time() - t0 < 300
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 75, out[-3000:] + err[-3000:]
    m = json.load(open(run2 / "manifest.json"))
    st = status_dict(str(run2))["stages"]
    assert m["state"] == "preempted" and st[0]["state"] == "preempted", st


def test_a_stage_hung_on_every_rank_is_killed_and_retried(data_prefix, tmp_path):
    """Every rank stops for good outside any collective after step 3 (a dead file system, a deadlock),
    so no collective timeout can fire (600 s here). With reliability.hang_timeout_s 8 the controller
    sees rank 0's heartbeat go stale, kills the ranks within the timeout plus its 5 s touch interval
    (and a poll), names the hang, retries from step 2 (the newest complete checkpoint), and the plan
    finishes (exit 0, 6/6)."""
    d = yaml.safe_load(open(_plan(tmp_path, data_prefix)))
    d["reliability"].update(collective_timeout_s=600, hang_timeout_s=8)
    plan = tmp_path / "hang.yaml"
    plan.write_text(yaml.safe_dump(d))
    run = tmp_path / "run"
    fault = json.dumps({"point": "step", "step": 3, "action": "hang", "once": str(tmp_path / "hung{rank}")})
    t0 = time.time()
    p = _run(str(plan), run, env={"MEGAGROW_FAULT": fault})
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    assert "hung: no progress for" in out and "retrying from its newest complete checkpoint (step 2" in out, out
    m = json.load(open(run / "manifest.json"))
    assert m["state"] == "done" and status_dict(str(run))["stages"][0]["step"] == 6
    ev = {e["event"]: e for e in m["events"]}
    idle = float(ev["retry"]["failure"].split("no progress for ")[1].split(" s")[0])
    assert 8 <= idle <= 8 + 5 + 2, ev["retry"]
    hung_at = min(os.path.getmtime(tmp_path / f"hung{r}") for r in (0, 1))
    print(f"hang detected: idle {idle} s, killed {ev['retry']['time'] - hung_at:.1f} s after the hang, run {time.time() - t0:.1f} s")
    assert ev["retry"]["time"] - hung_at <= 8 + 5 + 2, (ev["retry"]["time"] - hung_at, time.time() - t0)
