"""Bad inputs to `megagrow train` that need a real engine (single process, CPU): a corrupted checkpoint
file, another plan's or another stage's checkpoint, a world size that is not tp x dp, a diverging LR,
a full disk while saving, an empty `latest`. Each bad one is exactly one `error:` line, a non-zero
exit, no traceback, and no checkpoint file changed; the good ones resume."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, _env


def _plan(tmp_path, data, name="p", stage="a", d_model=32, dp=1, lr=3e-3, steps=4, **extra):
    d = {"name": name, "seed": 2, "data": {"prefix": data}, "reliability": extra.pop("reliability", {}),
         "stages": [{"name": stage, "model": {"n_layers": 1, "d_model": d_model, "n_heads": 2, "vocab_size": 512, "seq_len": 16},
                     "layout": {"tp": 1, "dp": dp, "zero_stage": 2, "micro_batch": 2}, "steps": steps, "save_every": 2,
                     "log_every": 1, "optim": {"lr": lr, "min_lr": min(lr, 1e-4), "warmup_steps": 0}, **extra}]}
    p = tmp_path / f"{name}-{stage}-{d_model}-{dp}-{lr}.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def _train(plan, run, stage="a"):
    env = _env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "megagrow.cli", "train", plan, "--stage", stage, "--run-dir", str(run)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def _one_error(r, needle, code=2):
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == code and len(errs) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    assert needle in errs[0], errs[0]
    return errs[0]


def _digest(path) -> dict:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_bad_resumes_are_one_line_and_change_nothing(data_prefix, tmp_path):
    """(1) one byte flipped in the newest checkpoint's optimizer file: the error names that file and offers
    the next older complete checkpoint; (2) the checkpoint of another plan (another model) and (3) of another
    stage: refused before loading; (4) a world size of 1 for tp 1 x dp 2; (5) lr 1e6: a non-finite loss stops
    the stage at once (exit 3) and no checkpoint is written with it; (6) an empty `latest` resumes from the
    newest complete checkpoint. In (1)-(5) no checkpoint file changes."""
    run = tmp_path / "run"
    plan = _plan(tmp_path, data_prefix)
    r = _train(plan, run)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = run / "a" / "checkpoints"
    before = _digest(ck)

    f = ck / "step_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    good = f.read_bytes()
    b = bytearray(good)
    b[len(b) // 2] ^= 0x40
    f.write_bytes(bytes(b))
    corrupted = _digest(ck)
    _one_error(_train(plan, run), "zero_pp_rank_0_mp_rank_00_optim_states.pt: checksum")
    e = _one_error(_train(plan, run), "the next older complete checkpoint is step_00000002")
    assert "megagrow verify" in e and _digest(ck) == corrupted
    f.write_bytes(good)

    _one_error(_train(_plan(tmp_path, data_prefix, name="other", d_model=64), run), "written for another model config")
    shutil.copytree(ck, run / "b" / "checkpoints")
    _one_error(_train(_plan(tmp_path, data_prefix, stage="b"), run, stage="b"), "is a checkpoint of stage 'a'")
    _one_error(_train(_plan(tmp_path, data_prefix, dp=2), run), "world size 1 != tp 1 x dp 2")
    assert _digest(ck) == before

    nan_run = tmp_path / "nan"
    _one_error(_train(_plan(tmp_path, data_prefix, lr=1e6), nan_run), "stopped without saving", code=3)
    assert not (nan_run / "a" / "checkpoints").exists() or not [t for t in os.listdir(nan_run / "a" / "checkpoints") if t.startswith("step_")]

    (ck / "latest").write_text("")
    r = _train(_plan(tmp_path, data_prefix, steps=6), run)
    assert r.returncode == 0 and "resumed stage a at step 4" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert (ck / "latest").read_text() == "step_00000006"


def _mount_tmpfs(path, size_bytes) -> bool:
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_while_saving_keeps_the_previous_checkpoint(data_prefix, tmp_path):
    """A run directory on a small tmpfs that holds about 1.5 checkpoints: the save that fills it is one
    `error:` line naming the tag, "No space left on device" and the previous complete checkpoint, which
    survives intact and is what a rerun would resume from; status.json says "failed"; no temp files."""
    from megagrow.state import manifest

    probe = tmp_path / "probe"
    r = _train(_plan(tmp_path, data_prefix, steps=2), probe)
    assert r.returncode == 0, r.stderr[-2000:]
    one = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(probe / "a") for f in fs)
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, int(one * 1.6) // 4096 * 4096):
        pytest.skip("cannot mount a tmpfs here (needs root); the disk-full path is then untested")
    try:
        run = mnt / "run"
        r = _train(_plan(tmp_path, data_prefix, steps=8, reliability={"keep_last": 0}), run)
        e = _one_error(r, "No space left on device", code=2)
        assert "previous complete checkpoint step_00000002 is kept" in e, e
        ck = str(run / "a" / "checkpoints")
        assert manifest.choose(ck)[0] == "step_00000002" and manifest.read_latest(ck) == "step_00000002"
        assert manifest.problems(os.path.join(ck, "step_00000002"), deep=True) == []
        import json

        assert json.load(open(run / "a" / "status.json"))["state"] == "failed"
        assert not [f for dp, _, fs in os.walk(run) for f in fs if ".tmp" in f]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_stage_held_by_another_set_of_ranks_is_refused(data_prefix, tmp_path):
    """While another process holds RUN/<stage>/.stage.lock (an orphaned rank 0, a second launcher),
    `megagrow train` on that stage is one `error:` line naming the lock, exit 2, and writes no
    checkpoint; once the lock is free the same command trains."""
    from megagrow.fsutil import try_exclusive_lock

    run = tmp_path / "run"
    os.makedirs(run / "a")
    held, why = try_exclusive_lock(str(run / "a" / ".stage.lock"))
    assert held is not None, why
    plan = _plan(tmp_path, data_prefix, steps=2)
    _one_error(_train(plan, run), "another set of ranks is training")
    assert not (run / "a" / "checkpoints").exists() or not os.listdir(run / "a" / "checkpoints")
    held.close()
    r = _train(plan, run)
    assert r.returncode == 0 and (run / "a" / "checkpoints" / "latest").read_text() == "step_00000002", r.stderr[-2000:]
