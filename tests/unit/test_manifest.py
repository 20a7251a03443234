"""Checkpoint completeness (megagrow/state/manifest.py) on real files, one process: a tag counts
only with its manifest and every file at the recorded size and CRC-32; resume skips the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest
from conftest import REPO, _env

from megagrow.errors import SaveFailed, UserError
from megagrow.state import manifest as mf
from megagrow.state.verify import verify_distributed


def _tag(ckpt, step, files=None, seal=True, keep_last=0):
    tag = f"step_{step:08d}"
    d = ckpt / tag
    d.mkdir(parents=True, exist_ok=True)
    for name, data in (
        files
        or {
            "mp_rank_00_model_states.pt": os.urandom(3000) + bytes([step]),
            "zero_pp_rank_0_mp_rank_00_optim_states.pt": os.urandom(5000),
            "zero_pp_rank_1_mp_rank_00_optim_states.pt": os.urandom(5000),
        }
    ).items():
        (d / name).write_bytes(data)
    if seal:
        mf.seal(
            str(ckpt),
            tag,
            {"plan": "p", "stage": "s", "stage_index": 0, "step": step, "sample_index": 8 * step, "layout": {"tp": 1, "dp": 2}},
            keep_last=keep_last,
        )
    return tag


def test_checksum_is_streamed_crc32(tmp_path):
    """checksum() == zlib.crc32 of the whole content, also across the 4 MiB chunk boundary."""
    data = os.urandom((1 << 22) + 12345)
    (tmp_path / "f").write_bytes(data)
    assert mf.checksum(str(tmp_path / "f")) == (len(data), f"{zlib.crc32(data):08x}")


def test_owner_rank_is_the_writer():
    """zero_pp_rank_D_mp_rank_TT files belong to global rank D*tp + T, mp_rank_TT model files to TP rank T
    at DP 0, anything else (or a rank outside the world) to rank 0."""
    assert mf.owner_rank("zero_pp_rank_1_mp_rank_01_optim_states.pt", tp=2, world=4) == 3
    assert mf.owner_rank("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", tp=2, world=4) == 2
    assert mf.owner_rank("mp_rank_01_model_states.pt", tp=2, world=4) == 1
    assert mf.owner_rank("zero_pp_rank_3_mp_rank_00_optim_states.pt", tp=1, world=2) == 0
    assert mf.owner_rank("notes.txt", tp=2, world=4) == 0


def test_seal_records_every_file_and_moves_latest(tmp_path):
    """The manifest lists every file with size and CRC-32 and the stage/step/data position; `latest`
    names the tag only after it; no temp file is left."""
    ckpt = tmp_path / "ck"
    t = _tag(ckpt, 4)
    m = json.loads((ckpt / t / mf.MANIFEST).read_text())
    assert set(m["files"]) == set(os.listdir(ckpt / t)) - {mf.MANIFEST}
    for name, rec in m["files"].items():
        data = (ckpt / t / name).read_bytes()
        assert rec == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    assert (m["step"], m["sample_index"], m["stage"], m["layout"]) == (4, 32, "s", {"tp": 1, "dp": 2})
    assert mf.read_latest(str(ckpt)) == t and mf.problems(str(ckpt / t)) == []
    assert not [n for root, _, fs in os.walk(tmp_path) for n in fs if ".tmp" in n]


def test_choose_skips_torn_and_names_them(tmp_path):
    """A newer tag without a manifest (a save killed half way) or with a file missing or truncated is
    skipped; the newest complete tag is chosen; each skipped tag comes with its reason."""
    ckpt = tmp_path / "ck"
    _tag(ckpt, 2)
    good = _tag(ckpt, 4)
    torn = _tag(ckpt, 6, seal=False)
    trunc = _tag(ckpt, 8)
    f = ckpt / trunc / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    gone = _tag(ckpt, 10)
    os.unlink(ckpt / gone / "mp_rank_00_model_states.pt")
    tag, skipped = mf.choose(str(ckpt))
    assert tag == good
    assert [s[0] for s in skipped] == [gone, trunc, torn]
    assert "missing" in skipped[0][1] and "size 100 != 5000" in skipped[1][1] and "no manifest" in skipped[2][1]


def test_flipped_byte_fails_verification_naming_file_and_older_tag(tmp_path):
    """Same size, one byte flipped: sizes pass (choose() takes it), the checksum does not; the error
    names the file and offers the next older complete checkpoint."""
    ckpt = tmp_path / "ck"
    old = _tag(ckpt, 2)
    new = _tag(ckpt, 4)
    f = ckpt / new / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    b = bytearray(f.read_bytes())
    b[2500] ^= 0xFF
    f.write_bytes(bytes(b))
    assert mf.choose(str(ckpt))[0] == new
    with pytest.raises(UserError) as e:
        verify_distributed(str(ckpt), new)
    msg = str(e.value)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: checksum" in msg and f"next older complete checkpoint is {old}" in msg
    verify_distributed(str(ckpt), old)  # the older one is fine


def test_keep_last_never_deletes_the_only_complete_one(tmp_path):
    """keep_last=2 keeps the 2 newest complete tags and drops older ones (complete or torn); a torn tag
    newer than them stays (it is the next save's); with one complete tag nothing complete is deleted."""
    ckpt = tmp_path / "ck"
    _tag(ckpt, 1, seal=False)
    only = _tag(ckpt, 2, keep_last=1)
    assert mf.complete_tags(str(ckpt)) == [only] and not (ckpt / "step_00000001").exists()
    _tag(ckpt, 3, keep_last=2)
    _tag(ckpt, 4, keep_last=2)
    torn = _tag(ckpt, 5, seal=False)
    assert mf.complete_tags(str(ckpt)) == ["step_00000004", "step_00000003"]
    assert sorted(os.listdir(ckpt)) == ["latest", "step_00000003", "step_00000004", torn]


def test_reseal_after_prepare_is_not_taken_for_the_old_one(tmp_path):
    """prepare() drops a tag's old manifest before it is written again: a rewrite killed half way is
    incomplete, not the old complete checkpoint with new bytes."""
    ckpt = tmp_path / "ck"
    t = _tag(ckpt, 2)
    mf.prepare(str(ckpt), t)
    assert mf.choose(str(ckpt))[0] is None


def test_seal_on_full_disk_keeps_previous_and_leaves_no_temp(tmp_path, monkeypatch):
    """An OSError while writing the manifest (ENOSPC) is one SaveFailed naming the tag and the previous
    complete checkpoint; `latest` keeps pointing at it; no manifest temp file is left."""
    import errno

    ckpt = tmp_path / "ck"
    prev = _tag(ckpt, 2)
    real = mf.json.dumps

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mf.json, "dumps", full)
    with pytest.raises(SaveFailed, match=f"No space left on device.*previous complete checkpoint {prev} is kept"):
        _tag(ckpt, 4)
    monkeypatch.setattr(mf.json, "dumps", real)
    assert mf.read_latest(str(ckpt)) == prev and mf.choose(str(ckpt))[0] == prev
    assert not [n for root, _, fs in os.walk(tmp_path) for n in fs if ".tmp" in n]


def test_verify_cli(tmp_path):
    """`megagrow verify`: exit 0 and ok for complete tags, exit 1 naming the bad file after a byte flip,
    --json parses; a path that does not exist is one error line, exit 2."""
    ckpt = tmp_path / "ck"
    _tag(ckpt, 2)
    t = _tag(ckpt, 4)

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "megagrow.cli", "verify", *args], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60
        )

    r = run(str(ckpt))
    assert r.returncode == 0 and r.stdout.count("ok ") == 2, r.stdout + r.stderr
    f = ckpt / t / "mp_rank_00_model_states.pt"
    b = bytearray(f.read_bytes())
    b[10] ^= 1
    f.write_bytes(bytes(b))
    r = run(str(ckpt / t), "--json")
    d = json.loads(r.stdout)
    assert r.returncode == 1 and not d["ok"] and "mp_rank_00_model_states.pt: checksum" in d["tags"][0]["problems"][0]
    r = run(str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and r.stderr.count("\n") == 1


def test_a_rank_checks_only_its_own_files(tmp_path, monkeypatch):
    """problems(only=True): a rank's share is stat'ed and checksummed, nothing else (no directory
    listing, no stat of another rank's file), and a damaged file in the share is still found;
    choose_once without torch.distributed is choose."""
    ckpt = tmp_path / "ck"
    tag = _tag(ckpt, 2)
    d = str(ckpt / tag)
    other = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(os.path.join(d, other), "r+b") as f:
        f.truncate(10)
    seen = []
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: seen.append(os.path.basename(p)) or real(p, *a, **k))
    monkeypatch.setattr(os, "listdir", lambda p: pytest.fail("listed the tag"))
    mine = ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert mf.problems(d, deep=True, names=mine, only=True) == [] and other not in seen
    assert mf.problems(d, deep=True, names=[other], only=True) == [f"{other}: size 10 != 5000 recorded"]
    monkeypatch.undo()
    assert mf.choose_once(str(ckpt)) == mf.choose(str(ckpt))
