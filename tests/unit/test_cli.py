"""The `megagrow` command line: every command a subcommand, `--set` plan overrides, and bad input as
exactly one line starting with 'error:', exit code 2, no traceback, nothing launched or written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, _env
from helpers import one_error, run_cli, tiny_dataset, tiny_plan


def _train(tmp_path, plan_text: str, *extra) -> subprocess.CompletedProcess:
    plan = tmp_path / "plan.yaml"
    plan.write_text(plan_text)
    return run_cli("train", plan, "--run-dir", tmp_path / "run", *extra)


PLAN = """name: bad
data: {{prefix: {prefix}}}
stages:
  - name: s
    model: {{n_layers: 1, d_model: 48, n_heads: {heads}, vocab_size: 512, seq_len: 16{extra}}}
    layout: {{tp: {tp}, dp: {dp}}}
    steps: 2
"""


@pytest.mark.parametrize(
    "case,needle",
    [
        ("heads", "n_heads 3 is not divisible by tp 2"),
        ("world", "world size 1 != tp 1 x dp 2"),
        ("data", "not found"),
        ("unknown", "unknown key(s) n_layer"),
    ],
)
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
    one_error(_train(tmp_path, PLAN.format(**kw)), needle)
    assert not os.path.exists(tmp_path / "run" / "s" / "checkpoints")


def test_missing_plan_file(tmp_path):
    r = run_cli("train", tmp_path / "nope.yaml", timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"error: plan file not found: {tmp_path / 'nope.yaml'}"


def test_help_explains_itself():
    r = run_cli("train", "--help", timeout=120)
    assert r.returncode == 0 and "SIGUSR1" in r.stdout and "--stage" in r.stdout and "--set KEY=VALUE" in r.stdout


def test_every_command_is_a_subcommand():
    """`megagrow --help` lists regrow, prepare-data, savings and growth-dynamics beside the others, and
    each answers its own --help under its subcommand's name (exit 0)."""
    r = run_cli("--help", timeout=120)
    assert r.returncode == 0, r.stderr
    for cmd in (
        "train",
        "run",
        "status",
        "verify",
        "plan",
        "bench",
        "plot",
        "export-hf",
        "regrow",
        "prepare-data",
        "savings",
        "growth-dynamics",
    ):
        assert cmd in r.stdout, cmd
    for cmd in ("regrow", "prepare-data", "export-hf", "savings", "growth-dynamics"):
        r = run_cli(cmd, "--help", timeout=120)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: megagrow {cmd}"), r.stdout[:200] + r.stderr


def test_tools_are_aliases_of_the_installed_package(tmp_path):
    """tools/*.py hold no sys.path edits (nor the E402 suppressions those need): run from another directory
    with no PYTHONPATH, tools/regrow.py finds the installed megagrow and is `megagrow regrow`."""
    for f in sorted(os.listdir(os.path.join(REPO, "tools"))):
        if f.endswith(".py"):
            src = open(os.path.join(REPO, "tools", f)).read()
            assert "sys.path" not in src and "E402" not in src, f
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "regrow.py"), "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.startswith("usage: megagrow regrow"), r.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "PLAN", "--stop-at", "-1"], "--stop-at must be an integer >= 0, got -1"),
        (["run", "PLAN", "--max-procs", "0"], "--max-procs must be an integer >= 1, got 0"),
        (["run", "PLAN", "--retries", "-1"], "--retries must be an integer >= 0, got -1"),
        (["run", "PLAN", "--grace", "-5"], "--grace must be a number of seconds >= 0, got -5"),
        (["run", "PLAN", "--grace", "nan"], "--grace must be a number of seconds >= 0, got nan"),
        (["run", "PLAN", "--max-nodes", "0"], "--max-nodes must be an integer >= 1, got 0"),
    ],
)
def test_out_of_range_numbers_are_refused(tmp_path, capsys, args, needle):
    """Out-of-range numeric options: one `error:` line, exit 2, before anything is created."""
    from megagrow.cli import main

    plan = tiny_plan(tmp_path / "plan.yaml", tiny_dataset(str(tmp_path / "tok")))
    run = tmp_path / "run"
    rc = main([plan if a == "PLAN" else a for a in args] + ["--run-dir", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"error: {needle}" and not run.exists(), err


def test_verify_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    """`megagrow verify` on a run directory, a stage directory or any other directory: one line
    "not a checkpoint directory: DIR", exit 2, with the path to verify where one is known."""
    run = tmp_path / "run"
    os.makedirs(run / "a" / "checkpoints")
    (run / "manifest.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("x")
    for d, hint in ((run, "a run directory"), (run / "a", f"verify {run / 'a' / 'checkpoints'}"), (tmp_path / "notes", "")):
        line = one_error(run_cli("verify", d, timeout=120), f"not a checkpoint directory: {d}")
        assert hint in line, line


@pytest.mark.parametrize(
    "override,needle",
    [
        ("stages.a.optim.lrr=1", "--set stages.a.optim.lrr=1: unknown key 'lrr' in optim"),
        ("reliability.keep_last=-1", "--set reliability.keep_last=-1: t.yaml.reliability: keep_last must be >= 0"),
        ("stages.z.steps=3", "--set stages.z.steps=3: the plan has no stage 'z'"),
        ("stages.a.layout.tp=3", "--set stages.a.layout.tp=3:"),
    ],
)
def test_a_bad_override_is_one_line_naming_it(tmp_path, override, needle):
    """`megagrow train --set` with an unknown key, a bad value or a stage the plan lacks: one line
    naming the override, exit 2, nothing written."""
    plan = tiny_plan(tmp_path / "t.yaml", tiny_dataset(str(tmp_path / "tok")))
    one_error(run_cli("train", plan, "--stage", "a", "--run-dir", tmp_path / "run", "--set", override, timeout=120), needle)
    assert not (tmp_path / "run").exists()


def test_overrides_reach_the_checkpoint_and_the_manifest(tmp_path):
    """`megagrow run PLAN --set ...`: the manifest lists the overrides and holds the overridden plan, the
    stage it launched records that plan in its checkpoint, and that plan equals the one loaded from a
    YAML file with the same values written in it (dict-equal); run again without them, it warns."""
    from megagrow.config import load_plan
    from megagrow.state.checkpoint import SourceCheckpoint

    data = tiny_dataset(str(tmp_path / "tok"))
    plan = tiny_plan(tmp_path / "t.yaml", data, stages=1)
    sets = ["stages.a.optim.lr=2e-3", "reliability.keep_last=3", "stages.*.log_every=2"]
    run = tmp_path / "run"
    r = run_cli("run", plan, "--run-dir", run, "--max-procs", "1", *[x for s in sets for x in ("--set", s)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    d = yaml.safe_load(open(plan))
    d["stages"][0]["optim"] = {"lr": 2e-3}
    d["stages"][0]["log_every"] = 2
    d["reliability"] = {"keep_last": 3}
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(d))
    want = {**load_plan(str(edited)).to_dict()}
    m = json.load(open(run / "manifest.json"))
    assert m["overrides"] == sets and m["plan"] == want
    src = SourceCheckpoint.open(str(run / "a" / "checkpoints"))
    assert src.client["plan"] == want and src.client["plan"]["stages"][0]["optim"]["lr"] == 2e-3
    assert load_plan(plan).to_dict() != want  # the file itself still says otherwise
    again = run_cli("run", plan, "--run-dir", run, "--dry-run", timeout=120)  # resumed without them: a warning
    assert again.returncode == 0 and f"warning: {run} was last run with --set {sets[0]}" in again.stderr, again.stderr


@pytest.mark.parametrize(
    "cmd", [["run", "PLAN", "--dry-run"], ["regrow", "--plan", "PLAN", "--to-stage", "b", "--dry-run"], ["bench", "PLAN", "--stage", "b"]]
)
def test_every_command_that_loads_a_plan_takes_overrides(tmp_path, cmd):
    """`--set` on run, regrow and bench is applied and validated like train's: a bad value is one line
    naming the override, exit 2."""
    plan = tiny_plan(tmp_path / "t.yaml", tiny_dataset(str(tmp_path / "tok")))
    args = [plan if a == "PLAN" else a for a in cmd]
    one_error(run_cli(*args, "--set", "stages.b.layout.tp=3", timeout=120), "--set stages.b.layout.tp=3: t.yaml.stages[1].layout:")
