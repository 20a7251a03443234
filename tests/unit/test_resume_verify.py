"""What a resume checks and reads (megagrow.state.verify.record_problems, reads.resume_read_plan)."""

from __future__ import annotations

import os

import pytest
import torch

from megagrow.config import ModelConfig
from megagrow.state import manifest, verify
from megagrow.state.reads import resume_read_plan

MARK = "record_marker_0123456789"


def _module_file(tmp_path, crc: bool = True):
    """A sealed tag holding one torch.save file shaped like a ZeRO-1/2 module file: weights and a record
    (crc: whether torch.save writes its zip entries' CRC-32s; megagrow.state.writer turns them off)."""
    ckpt = tmp_path / "ck"
    tag = ckpt / "step_00000002"
    tag.mkdir(parents=True)
    name = "mp_rank_00_model_states.pt"
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(crc)
    try:
        torch.save({"module": {"w": torch.full((1 << 16,), 3.25)}, MARK: {"step": 2}}, str(tag / name))
    finally:
        torch.serialization.set_crc32_options(before)
    manifest.seal(str(ckpt), "step_00000002", {"step": 2})
    return str(tag), name


def _flip(path: str, needle: bytes) -> None:
    data = bytearray(open(path, "rb").read())
    i = data.find(needle)
    assert i >= 0
    data[i + len(needle) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("crc", [True, False])
def test_record_check_catches_a_corrupted_record_and_ignores_weights_it_never_reads(tmp_path, crc):
    """Property: the module file's record check (size + the record's CRC-32 recorded at seal time) passes on
    the intact file (also when torch.save wrote no per-entry CRCs), reports a byte flipped inside the pickled
    record, and does not read a weight storage (a byte flipped there: the full checksum reports it, the record
    check, which the resume relies on only because the resume never reads those bytes, does not); a
    truncated file is a size mismatch."""
    tag_dir, name = _module_file(tmp_path, crc)
    path = os.path.join(tag_dir, name)
    good = open(path, "rb").read()
    assert "record_crc32" in manifest.read_manifest(tag_dir)["files"][name]
    assert verify.record_problems(tag_dir, name) == []
    _flip(path, torch.tensor([3.25] * 4).numpy().tobytes())
    assert manifest.problems(tag_dir, deep=True, names=[name], only=True)[0].startswith(f"{name}: checksum")
    assert verify.record_problems(tag_dir, name) == []
    open(path, "wb").write(good)
    _flip(path, MARK.encode())
    bad = verify.record_problems(tag_dir, name)
    assert len(bad) == 1 and bad[0].startswith(f"{name}: record checksum"), bad
    open(path, "wb").write(good[:-100])
    assert "size" in verify.record_problems(tag_dir, name)[0]


def test_record_check_without_a_recorded_record_checksum_checks_the_whole_file(tmp_path):
    """Property: a manifest sealed before record checksums were recorded gets the whole-file CRC-32: a byte
    flipped in a weight storage is reported."""
    import json

    tag_dir, name = _module_file(tmp_path)
    mpath = os.path.join(tag_dir, manifest.MANIFEST)
    m = json.load(open(mpath))
    del m["files"][name]["record_crc32"]
    open(mpath, "w").write(json.dumps(m))
    path = os.path.join(tag_dir, name)
    _flip(path, torch.tensor([3.25] * 4).numpy().tobytes())
    assert verify.record_problems(tag_dir, name)[0].startswith(f"{name}: checksum")


def test_resume_read_plan_arithmetic():
    """Property: per rank, the shard reader reads 12 bytes (fp32 master + 2 moments) per element of its own
    partitions, summing over DP ranks to 12 B x the TP-local padded parameters, and checksums its optimizer
    file (12 B per partition element); engine.load_checkpoint at ZeRO-1/2 reads in addition the whole
    TP-local module file (2 B/element bf16) on every rank, and the first DP rank of each TP rank checksums
    it; at ZeRO-3 the module files are metadata only."""
    import math

    from megagrow.state.checkpoint import SourceCheckpoint

    m = ModelConfig(flavour="gpt2", n_layers=2, d_model=64, n_heads=4, vocab_size=512, seq_len=32)
    local = sum(math.prod(s) for s in SourceCheckpoint.planned(m, 2, 2, 1).local_shapes.values())  # one TP rank's
    assert local < m.num_params()
    r = resume_read_plan(m, tp=2, dp=2, zero_stage=1, dtype="bf16")
    new, old = r["shard_reader"], r["load_checkpoint"]
    assert len(new["bytes_read_per_rank"]) == 4
    tp0 = new["bytes_read_per_rank"][0] + new["bytes_read_per_rank"][2]  # TP rank 0's two DP ranks (TP fastest)
    assert 12 * local <= tp0 <= 12 * (local + 2 * 2 * 2)  # each of 2 groups padded to a multiple of 2 x dp
    for v, b in zip(new["verify_bytes_per_rank"], new["bytes_read_per_rank"]):  # its optimizer file: what it reads
        assert 0 <= v - b <= 12 * 2 * 2 * 2  # + the partitions' padding
    module = old["bytes_read_per_rank"][0] - new["bytes_read_per_rank"][0]
    assert module == 2 * local  # the whole TP-local module file, bf16
    assert old["verify_bytes_per_rank"][:2] == [new["verify_bytes_per_rank"][0] + module] * 2
    assert old["verify_bytes_per_rank"][2:] == new["verify_bytes_per_rank"][2:]
    z3 = resume_read_plan(m, tp=1, dp=2, zero_stage=3, dtype="fp32")
    assert z3["load_checkpoint"]["bytes_read_per_rank"] == z3["shard_reader"]["bytes_read_per_rank"]


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_the_metadata_file_is_checked_as_far_as_a_regrow_or_resume_reads_it(tmp_path, zero_stage):
    """Property: the metadata file every rank of a regrow or resume opens is checked by what is read of it:
    from a ZeRO-1/2 source its record only (a byte flipped in a weight storage, which no reader of that file
    touches, is not reported; one flipped in the record is), from any other source the whole file (the weight
    flip is reported)."""
    from types import SimpleNamespace

    from megagrow.state.reads import metadata_problems

    tag_dir, name = _module_file(tmp_path)
    path = os.path.join(tag_dir, name)
    good = open(path, "rb").read()
    src = SimpleNamespace(zero_stage=zero_stage)
    assert metadata_problems(src, tag_dir, name) == []
    _flip(path, torch.tensor([3.25] * 4).numpy().tobytes())
    weight_flip = metadata_problems(src, tag_dir, name)
    assert weight_flip == [] if zero_stage in (1, 2) else weight_flip[0].startswith(f"{name}: checksum"), weight_flip
    open(path, "wb").write(good)
    _flip(path, MARK.encode())
    assert len(metadata_problems(src, tag_dir, name)) == 1
