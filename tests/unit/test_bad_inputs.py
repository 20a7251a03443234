"""Bad inputs to `megagrow run`, `megagrow status` and prepare_data: each is exactly one `error:` line
on stderr, exit 2, no traceback, and nothing created or overwritten (no run directory appears, an
existing manifest keeps its bytes). The controller never loads torch, so these run in process."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

from megagrow.cli import main as megagrow
from megagrow.data.dataset import DatasetWriter


def _dataset(prefix: str, tokens: int, vocab: int = 512) -> str:
    with DatasetWriter(prefix, vocab) as w:
        w.add_document(np.arange(tokens, dtype=np.int64) % (vocab - 3) + 3)
    return prefix


def _plan(tmp_path, data: str, **stage1) -> str:
    """A 2-stage plan (a -> b by depth), valid unless edited; returns its path."""
    d = {
        "name": "bad",
        "seed": 1,
        "data": {"prefix": data},
        "defaults": {"steps": 4, "optim": {"lr": "3e-4", "min_lr": 1.0e-5}},
        "stages": [
            {
                "name": "a",
                "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "vocab_size": 512, "seq_len": 16},
                "layout": {"tp": 1, "dp": 2, "zero_stage": 2, "micro_batch": 2},
            },
            {
                "name": "b",
                "grow": "depth",
                "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "vocab_size": 512, "seq_len": 16},
                "layout": {"tp": 2, "dp": 1, "zero_stage": 1, "micro_batch": 2},
            },
        ],
    }
    for k, v in stage1.items():
        if isinstance(v, dict) and isinstance(d["stages"][1].get(k), dict):
            d["stages"][1][k] = {**d["stages"][1][k], **v}
        else:
            d["stages"][1][k] = v
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def _one_error(capsys, rc, needle: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def data(tmp_path):
    return _dataset(str(tmp_path / "tokens"), 2000)


def _edits(data_dir):
    """(name, plan edit or special, needle): every one is refused before anything is created."""
    return [
        ("negative steps", {"steps": -3}, "steps must be a positive integer, got -3"),
        ("zero stage out of range", {"layout": {"zero_stage": 5}}, "zero_stage must be 0, 1, 2 or 3, got 5"),
        ("heads % tp", {"model": {"n_heads": 3, "d_model": 48}}, "not divisible by tp 2"),
        ("dp x tp beyond the machine", {"layout": {"tp": 2, "dp": 2}}, "4 processes does not fit this machine"),
        ("unknown operator", {"grow": "deepen"}, "unknown growth operator 'deepen'"),
        ("growth the operator cannot do", {"grow": "width"}, "grow 'width' from stage 'a'"),
        ("dropout as a word", {"model": {"dropout": "lots"}}, "dropout must be a number, got str 'lots'"),
        ("grow as an int", {"grow": 2}, "grow must be a string or null, got int 2"),
        ("ds_config as a list", {"layout": {"ds_config": ["x"]}}, "ds_config must be a string or null, got list"),
        ("seq_len beyond what the grown model has", {"model": {"seq_len": 4096}}, "grown vs target: {'seq_len': (16, 4096)}"),
    ]


@pytest.mark.parametrize("i", range(10))
def test_bad_plan_is_one_line_and_creates_nothing(tmp_path, capsys, data, i):
    """Plan mistakes (types, ranges, layouts, the growth chain, a seq_len the growth cannot give): one line,
    exit 2, no run directory."""
    name, edit, needle = _edits(str(tmp_path))[i]
    run = tmp_path / "run"
    rc = megagrow(["run", _plan(tmp_path, data, **edit), "--run-dir", str(run), "--max-procs", "2"])
    _one_error(capsys, rc, needle)
    assert not run.exists(), name


def test_float_strings_in_a_plan_are_fine(tmp_path, capsys, data):
    """The control case: the same plan with `lr: 3e-4` as YAML 1.1 reads it (a string) validates (dry run, exit 0)."""
    assert megagrow(["run", _plan(tmp_path, data), "--run-dir", str(tmp_path / "run"), "--max-procs", "2", "--dry-run"]) == 0


def test_data_problems_are_caught_before_launch(tmp_path, capsys):
    """Tokenizer/vocab mismatch, an empty or tiny dataset, a truncated .bin, an unreadable (missing) path,
    malformed YAML: each one line, exit 2, before any launch, no run directory."""
    run = tmp_path / "run"
    cases = []
    cases.append((_dataset(str(tmp_path / "wide"), 2000, vocab=4096), "has vocab 4096 > the model's vocab_size 512"))
    cases.append((_dataset(str(tmp_path / "tiny"), 10), "shorter than one sequence of 17 tokens"))
    trunc = _dataset(str(tmp_path / "trunc"), 2000)
    with open(trunc + ".bin", "r+b") as f:
        f.truncate(1000)
    cases.append((trunc, "trunc.bin has 1000 bytes but its index says 2001 tokens"))
    cases.append((str(tmp_path / "nowhere"), "not found"))
    for prefix, needle in cases:
        rc = megagrow(["run", _plan(tmp_path, prefix), "--run-dir", str(run), "--max-procs", "2"])
        _one_error(capsys, rc, needle)
        assert not run.exists()
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\nstages: [\n  - {name: a\n")
    _one_error(capsys, megagrow(["run", str(bad), "--run-dir", str(run)]), "not valid YAML")
    assert not run.exists()


def test_status_on_a_manifest_that_is_not_an_object(tmp_path, capsys):
    """`megagrow status` on a manifest that is a JSON string, or not JSON: one line, exit 2, file untouched."""
    run = tmp_path / "run"
    run.mkdir()
    for content, needle in ((json.dumps("just a string"), "is a JSON str, not a run manifest object"), ("{not json", "is not valid JSON")):
        (run / "manifest.json").write_text(content)
        _one_error(capsys, megagrow(["status", str(run)]), needle)
        assert (run / "manifest.json").read_text() == content


def test_prepare_data_dangling_symlink(tmp_path, capsys):
    """prepare_data with a dangling symlink among the files of an input directory: one line naming it, no output."""
    from megagrow.data.prepare import main as prepare

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("some text to tokenize " * 50)
    os.symlink(str(tmp_path / "gone.txt"), src / "b.txt")
    rc = prepare(["--out", str(tmp_path / "out" / "x"), "--input", str(src), "--vocab-size", "400", "--no-progress"])
    _one_error(capsys, rc, "b.txt is a dangling symlink")
    assert not (tmp_path / "out" / "x.bin").exists()


@pytest.mark.parametrize(
    "content,needle",
    [
        ("[1, 2]", "expected a JSON object of DeepSpeed settings, got a JSON list"),
        ('"zero3"', "expected a JSON object of DeepSpeed settings, got a JSON str"),
        ('{"zero_optimization": [3]}', "zero_optimization must be a JSON object, got a JSON list"),
        ("{not json", "not readable as JSON"),
    ],
)
def test_ds_config_that_is_not_an_object_is_refused_before_launch(tmp_path, capsys, data, content, needle):
    """A ds_config file that is not a JSON object (or whose zero_optimization is not one): one line at
    validation, exit 2, no run directory (every rank would otherwise fail on it in DeepSpeed's config)."""
    ds = tmp_path / "ds.json"
    ds.write_text(content)
    run = tmp_path / "run"
    rc = megagrow(["run", _plan(tmp_path, data, layout={"ds_config": str(ds)}), "--run-dir", str(run), "--max-procs", "2"])
    _one_error(capsys, rc, needle)
    assert not run.exists()


def test_read_only_run_directory(tmp_path, capsys, data):
    """`megagrow run` into a read-only file system (a read-only tmpfs: root ignores chmod), the run directory
    itself or one to be made in it: one line naming the directory and the cause, exit 2."""
    from helpers import tmpfs

    with tmpfs(tmp_path / "ro", readonly=True) as ro:
        for run in (ro, os.path.join(ro, "run")):
            rc = megagrow(["run", _plan(tmp_path, data), "--run-dir", run, "--max-procs", "2"])
            line = _one_error(capsys, rc, f"cannot write to the run directory {run} (Read-only file system")
            assert ".controller.lock" in line or run.endswith("run")


# ---- failures that need a trained stage (one `megagrow train` of a tiny stage, shared)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory whose stage a (1 layer, 4 steps) is done, its plan and dataset."""
    from helpers import run_cli, tiny_dataset, tiny_plan

    d = tmp_path_factory.mktemp("trained")
    plan = tiny_plan(d / "t.yaml", tiny_dataset(str(d / "tok")))
    r = run_cli("train", plan, "--stage", "a", "--run-dir", d / "run")
    assert r.returncode == 0, r.stderr[-4000:]
    return {"plan": plan, "run": str(d / "run"), "dir": d}


def test_export_to_a_read_only_destination(tmp_path, trained):
    """`megagrow export-hf` into a read-only file system: one line with the cause, exit 2, nothing left."""
    pytest.importorskip("transformers")
    from helpers import one_error, run_cli, tmpfs

    with tmpfs(tmp_path / "ro", readonly=True) as ro:
        out = os.path.join(ro, "model")
        r = run_cli("export-hf", os.path.join(trained["run"], "a", "checkpoints"), out, "--no-tokenizer", "--no-progress")
        one_error(r, f"export-hf to {out}: Read-only file system")
        assert os.listdir(ro) == []


def test_disk_full_during_a_transition(tmp_path, trained):
    """The transition a -> b writing its checkpoint onto a full disk: one line with "No space left on
    device", exit 2, no traceback (torch.save's RuntimeError included), and no checkpoint of b appears."""
    import shutil

    from helpers import fill, one_error, run_cli, tmpfs

    with tmpfs(tmp_path / "small", size="4m") as small:
        run = os.path.join(small, "run")
        shutil.copytree(os.path.join(trained["run"], "a"), os.path.join(run, "a"))
        fill(small, leave_kb=100)
        r = run_cli("train", trained["plan"], "--stage", "b", "--run-dir", run)
        one_error(r, "No space left on device")
        assert "RuntimeError" not in r.stderr and not os.path.exists(os.path.join(run, "b", "checkpoints"))


def test_disk_full_during_a_save_under_run(tmp_path):
    """`megagrow run` whose first save finds the disk full: one `error:` line ("No space left on device"),
    exit 2, and `megagrow status` says failed for the run and the stage (not running), although the disk
    stays full (the manifest is rewritten in its own blocks)."""
    from helpers import fill, run_cli, tiny_dataset, tiny_plan, tmpfs

    plan = tiny_plan(tmp_path / "t.yaml", tiny_dataset(str(tmp_path / "tok")), stages=1)
    with tmpfs(tmp_path / "small", size="2m") as small:
        fill(small, leave_kb=100)
        run = os.path.join(small, "run")
        r = run_cli("run", plan, "--run-dir", run, "--max-procs", "1")
        errors = [ln for ln in r.stderr.splitlines() + r.stdout.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and "No space left on device" in errors[0], r.stdout + r.stderr
        assert "Traceback" not in r.stderr
        st = run_cli("status", run, "--json")
        assert st.returncode == 0, st.stderr
        d = json.loads(st.stdout)
        assert d["state"] == "failed" and [s["state"] for s in d["stages"]] == ["failed"], d
