"""Preemption: SIGUSR1 to one rank mid-training -> all ranks agree, save, exit 75; resume loses no step."""

from __future__ import annotations

import json
import os
import signal
import time

from conftest import spawn_ranks

PLAN = """name: sig
seed: 3
data: {{prefix: {prefix}}}
stages:
  - name: s0
    model: {{n_layers: 1, d_model: 32, n_heads: 2, vocab_size: 512, seq_len: 16, dropout: 0.1}}
    layout: {{tp: 1, dp: 2, zero_stage: 2, micro_batch: 2}}
    optim: {{warmup_steps: 5}}
    steps: 400
    save_every: 1000
    log_every: 1
"""


def _log(run_dir):
    path = os.path.join(run_dir, "s0", "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in (json.loads(line) for line in f if line.endswith("\n")) if "loss" in r]  # training records


def _wait(procs, timeout=300):
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], outs


def test_sigusr1_saves_exits_75_and_resume_loses_no_step(tmp_path, data_prefix):
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.format(prefix=data_prefix))
    run = str(tmp_path / "run")
    procs = spawn_ranks(2, ["train", str(plan), "--run-dir", run])
    deadline = time.time() + 240
    while len(_log(run)) < 3:
        assert time.time() < deadline and all(p.poll() is None for p in procs), "training did not start"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGUSR1)  # one rank only: the ranks must agree among themselves
    codes, outs = _wait(procs)
    assert codes == [75, 75], outs
    with open(os.path.join(run, "s0", "status.json")) as f:
        status = json.load(f)
    s = status["step"]
    assert status["state"] == "preempted" and 3 <= s < 400
    assert os.path.isdir(os.path.join(run, "s0", "checkpoints", f"step_{s:08d}"))
    assert [r["step"] for r in _log(run)] == list(range(1, s + 1))

    # resume (torchrun-style variables this time) to s+3; an uninterrupted run to s+3 for comparison
    codes, outs = _wait(spawn_ranks(2, ["train", str(plan), "--run-dir", run, "--stop-at", str(s + 3)], slurm_env=False))
    assert codes == [0, 0], outs
    assert f"resumed stage s0 at step {s}" in outs[0][0]
    ref = str(tmp_path / "ref")
    codes, outs = _wait(spawn_ranks(2, ["train", str(plan), "--run-dir", ref, "--stop-at", str(s + 3)]))
    assert codes == [0, 0], outs
    got, want = _log(run), _log(ref)
    assert [r["step"] for r in got] == list(range(1, s + 4)), "a step was lost or repeated"
    assert [r["loss"] for r in got] == [r["loss"] for r in want], "resumed curve differs from uninterrupted"
