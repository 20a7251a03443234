"""CLI behaviour on bad input: exactly one line starting with 'error:', exit code 2, no traceback,
nothing launched or written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, _env


def _train(tmp_path, plan_text: str, *extra) -> subprocess.CompletedProcess:
    plan = tmp_path / "plan.yaml"
    plan.write_text(plan_text)
    return subprocess.run([sys.executable, "-m", "megagrow.cli", "train", str(plan), "--run-dir", str(tmp_path / "run"), *extra],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)


PLAN = """name: bad
data: {{prefix: {prefix}}}
stages:
  - name: s
    model: {{n_layers: 1, d_model: 48, n_heads: {heads}, vocab_size: 512, seq_len: 16{extra}}}
    layout: {{tp: {tp}, dp: {dp}}}
    steps: 2
"""


@pytest.mark.parametrize("case,needle", [
    ("heads", "n_heads 3 is not divisible by tp 2"),
    ("world", "world size 1 != tp 1 x dp 2"),
    ("data", "not found"),
    ("unknown", "unknown key(s) n_layer"),
])
def test_bad_input_one_line_nonzero_exit(tmp_path, data_prefix, case, needle):
    kw = dict(prefix=data_prefix, heads=4, tp=1, dp=1, extra="")
    if case == "heads":
        kw.update(heads=3, tp=2)
    elif case == "world":
        kw.update(dp=2)
    elif case == "data":
        kw.update(prefix=str(tmp_path / "missing"))
    elif case == "unknown":
        kw.update(extra=", n_layer: 3")
    r = _train(tmp_path, PLAN.format(**kw))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1 and needle in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "run" / "s" / "checkpoints")


def test_missing_plan_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "megagrow.cli", "train", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"error: plan file not found: {tmp_path / 'nope.yaml'}"


def test_help_explains_itself():
    r = subprocess.run([sys.executable, "-m", "megagrow.cli", "train", "--help"], capture_output=True, text=True,
                       env=_env(), cwd=REPO, timeout=120)
    assert r.returncode == 0 and "SIGUSR1" in r.stdout and "--stage" in r.stdout
