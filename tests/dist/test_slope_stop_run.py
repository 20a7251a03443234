"""`stop: {rule: slope}` for real: `megagrow run` (the local controller, 2 processes) trains stage
`small` of the tiny test plan until the slope rule fires on its logged loss, grows `wide` from
that checkpoint and finishes; the stage ended exactly where the rule, replayed offline on the
logged points, says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from conftest import REPO, _env
from megagrow.config import load_plan
from megagrow.controller import status_dict
from megagrow.schedule.stop import StageStop


def test_slope_rule_ends_a_stage_early_and_the_plan_goes_on(tmp_path, data_prefix):
    with open(os.path.join(REPO, "recipes", "tiny_test.yaml")) as f:
        d = yaml.safe_load(f)
    d["stages"] = d["stages"][:2]
    d["stages"][0].update(steps=40, stop={"rule": "slope", "threshold": -0.06, "window": 4, "min_steps": 8})
    plan_path = tmp_path / "slope.yaml"
    plan_path.write_text(yaml.safe_dump(d, sort_keys=False))
    run = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "megagrow.cli", "run", str(plan_path), "--run-dir", run, "--data", data_prefix,
                        "--max-procs", "2"], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    with open(os.path.join(run, "small", "log.jsonl")) as f:
        logged = [r for r in map(json.loads, f) if "loss" in r]  # training records (eval records carry eval_loss)
    with open(os.path.join(run, "small", "status.json")) as f:
        st = json.load(f)
    end = st["step"]
    assert st["state"] == "done" and st.get("stopped_by") == "slope" and 8 <= end < 40, st
    assert [x["step"] for x in logged] == list(range(1, end + 1))
    # offline: the same rule on the logged points fires first at `end`
    plan = load_plan(str(plan_path))
    rule = StageStop(plan, 0)
    assert [x["step"] for x in logged if rule.update(x["step"], x["loss"])][:1] == [end]
    assert f"slope rule (d log L / d log C" in r.stdout and f"ends the stage at step {end}" in r.stdout
    # the next stage grew from the early-stopped checkpoint and ran to its end
    with open(os.path.join(run, "wide", "status.json")) as f:
        wide = json.load(f)
    assert wide["state"] == "done" and wide["step"] == 12
    assert wide["sample_index"] == end * 8 + 12 * 8  # the data stream went on from where `small` stopped
    with open(os.path.join(run, "manifest.json")) as f:
        m = json.load(f)
    assert m["state"] == "done" and [s["state"] for s in status_dict(run)["stages"]] == ["done", "done"]

    # the stage record survives save -> reshard -> resume: every field equal (final_step included,
    # so the resharded stage does not train on to `steps`), only the layout changes
    from megagrow.state.checkpoint import SourceCheckpoint

    d2 = dict(d, stages=[dict(d["stages"][0], layout={"tp": 2, "dp": 1, "zero_stage": 1, "micro_batch": 8})])
    plan2_path = tmp_path / "slope_tp2.yaml"
    plan2_path.write_text(yaml.safe_dump(d2, sort_keys=False))
    out = tmp_path / "run2" / "small" / "checkpoints"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
                        "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", os.path.join(REPO, "tools", "regrow.py"),
                        "--src", os.path.join(run, "small", "checkpoints"), "--plan", str(plan2_path), "--to-stage", "small",
                        "--out", str(out), "--json"], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a = SourceCheckpoint.open(os.path.join(run, "small", "checkpoints")).record
    b = SourceCheckpoint.open(str(out)).record
    assert a.final_step == end and b.final_step == end
    assert b.stage.layout.tp == 2 and b.stage.model == a.stage.model
    assert b.replace(plan=a.plan) == a  # step, sample offset/index, lr offset, rewarmup, final step, loss
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
                        "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", "-m", "megagrow.cli", "train", str(plan2_path),
                        "--stage", "small", "--run-dir", str(tmp_path / "run2"), "--data", data_prefix],
                       capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed stage small at step {end}" in r.stdout and "step 13/" not in r.stdout and f"step {end + 1}/" not in r.stdout


def test_slope_rule_on_the_eval_loss_ends_a_stage_at_an_eval(tmp_path, data_prefix):
    """A stage that evaluates (eval_every 2) is ended by the rule on its periodic eval losses, not on
    the training loss: it ends at an eval step, status says slope, and the same rule replayed
    offline on the logged periodic eval records (use_eval=True) fires first at that step."""
    with open(os.path.join(REPO, "recipes", "tiny_test.yaml")) as f:
        d = yaml.safe_load(f)
    d["stages"] = d["stages"][:2]
    d["stages"][1]["steps"] = 2
    # a shallow threshold: the eval curve (steep early in training) crosses it once the window is full
    d["stages"][0].update(steps=40, eval_every=2, eval_tokens=512,
                          stop={"rule": "slope", "threshold": -0.3, "window": 4, "min_steps": 8})
    plan_path = tmp_path / "slope_eval.yaml"
    plan_path.write_text(yaml.safe_dump(d, sort_keys=False))
    run = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "megagrow.cli", "run", str(plan_path), "--run-dir", run, "--data", data_prefix,
                        "--max-procs", "2"], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(run, "small", "status.json")) as f:
        st = json.load(f)
    end = st["step"]
    assert st["state"] == "done" and st.get("stopped_by") == "slope" and 8 <= end < 40 and end % 2 == 0, st
    with open(os.path.join(run, "small", "log.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    evals = [x for x in logged if "eval_loss" in x and x.get("at") == "periodic"]
    assert evals and evals[-1]["step"] <= end
    rule = StageStop(load_plan(str(plan_path)), 0, use_eval=True)
    fired = [x["step"] for x in logged if rule.observe(x)]
    assert fired[:1] == [end], (fired, end)
    assert "slope rule on the eval loss" in r.stdout
