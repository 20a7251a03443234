"""Which checkpoint a reader reads (manifest.current): the tag asked for, else the newest complete one,
never a tag only because `latest` names it. export-hf and regrow go through it: a corrupted, short or
unsealed tag is refused with one `error:` line naming the file and the older complete tag, or skipped
with a `note:` line, and nothing is written. One process, real files (the refusals come before any
tensor is read)."""

from __future__ import annotations

import os

import numpy as np
import yaml

from megagrow.data.dataset import DatasetWriter
from megagrow.state import manifest as mf

OPTIM = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


def _tag(ckpt, step, seal=True):
    tag = f"step_{step:08d}"
    d = ckpt / tag
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("mp_rank_00_model_states.pt", 3000), ("zero_pp_rank_0_mp_rank_00_optim_states.pt", 5000), (OPTIM, 5000)):
        (d / name).write_bytes(os.urandom(n))
    if seal:
        mf.seal(
            str(ckpt),
            tag,
            {"plan": "p", "stage": "s", "stage_index": 0, "step": step, "sample_index": 8 * step, "layout": {"tp": 1, "dp": 2}},
        )
    return tag


def _flip(path, at=100):
    b = bytearray(open(path, "rb").read())
    b[at : at + 4] = bytes(x ^ 0xFF for x in b[at : at + 4])
    open(path, "wb").write(bytes(b))


def _one_error(capsys, rc) -> tuple[str, str]:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0], err


def test_export_of_a_corrupted_checkpoint_is_refused_naming_the_file(tmp_path, capsys):
    """export-hf of a tag with 4 flipped bytes (same size: only the checksum sees it) exits 2 with one
    error line naming the file and the checksum, and writes nothing."""
    from megagrow.cli.export import main as export_hf

    ck = tmp_path / "s0" / "checkpoints"
    _tag(ck, 1)
    t2 = _tag(ck, 2)
    _flip(ck / t2 / OPTIM)
    out = tmp_path / "hf"
    line, _ = _one_error(capsys, export_hf([str(ck.parent), str(out), "--no-tokenizer", "--no-progress"]))
    assert OPTIM in line and "checksum" in line and "step_00000001" in line, line
    assert not out.exists() and not (tmp_path / "hf.export-tmp").exists()


def test_latest_naming_an_unsealed_tag_falls_back_and_says_so(tmp_path):
    """`latest` naming a tag with no manifest (a save that never finished): readers take the older
    complete tag, with a note naming both; asked for by name, that tag is refused."""
    from megagrow.cli.export import resolve_checkpoint

    ck = tmp_path / "s0" / "checkpoints"
    t1 = _tag(ck, 1)
    t2 = _tag(ck, 2, seal=False)
    mf.write_latest(str(ck), t2)
    assert resolve_checkpoint(str(ck.parent), None) == (str(ck), t1)
    said = []
    assert mf.current(str(ck), say=said.append) == t1
    assert len(said) == 1 and t2 in said[0] and t1 in said[0] and "no manifest" in said[0], said
    try:
        resolve_checkpoint(str(ck), t2)
        raise AssertionError("an unsealed tag asked for by name was accepted")
    except mf.UserError as e:
        assert "no manifest" in str(e) and t1 in str(e), e


def test_a_file_of_another_size_than_its_manifest_is_noticed(tmp_path):
    """A file cut short after its tag was sealed: the tag is skipped (falling back to the older one), and
    asked for by name it is refused naming the file and the size."""
    from megagrow.cli.export import resolve_checkpoint

    ck = tmp_path / "s0" / "checkpoints"
    t1 = _tag(ck, 1)
    t2 = _tag(ck, 2)
    with open(ck / t2 / OPTIM, "r+b") as f:
        f.truncate(1000)
    assert resolve_checkpoint(str(ck), None) == (str(ck), t1)
    try:
        resolve_checkpoint(str(ck / t2), None)
        raise AssertionError("a short file was not noticed")
    except mf.UserError as e:
        assert OPTIM in str(e) and "size 1000" in str(e) and t1 in str(e), e


def _plan(tmp_path) -> str:
    prefix = str(tmp_path / "tokens")
    with DatasetWriter(prefix, 512) as w:
        w.add_document(np.arange(2000, dtype=np.int64) % 509 + 3)
    m = {"n_layers": 1, "d_model": 32, "n_heads": 2, "vocab_size": 512, "seq_len": 16}
    d = {
        "name": "rg",
        "seed": 1,
        "data": {"prefix": prefix},
        "defaults": {"steps": 4, "optim": {"lr": "3e-4"}},
        "stages": [
            {"name": "s", "model": m, "layout": {"tp": 1, "dp": 2, "zero_stage": 2, "micro_batch": 2}},
            {"name": "b", "grow": "depth", "model": {**m, "n_layers": 2}, "layout": {"tp": 1, "dp": 1, "zero_stage": 1, "micro_batch": 2}},
        ],
    }
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def test_regrow_of_a_torn_source_refuses_or_falls_back_saying_so(tmp_path, capsys):
    """tools/regrow.py --src with a torn tag (no manifest: its save never finished): asked for by name it
    is refused (one error line naming the older complete tag, no output); by default the older complete
    tag is read instead, with a note naming both."""
    from megagrow.cli.regrow import main as regrow

    ck = tmp_path / "ck"
    t1 = _tag(ck, 1)
    t2 = _tag(ck, 2, seal=False)
    mf.write_latest(str(ck), t2)
    out = tmp_path / "out"
    args = ["--src", str(ck), "--plan", _plan(tmp_path), "--to-stage", "b", "--out", str(out)]
    line, _ = _one_error(capsys, regrow(args + ["--tag", t2]))
    assert t2 in line and "no manifest" in line and t1 in line, line
    assert not out.exists() and not (tmp_path / "out.regrow-tmp").exists()
    # by default: the older complete tag (its random bytes then fail to load: one error line, nothing written)
    _, err = _one_error(capsys, regrow(args))
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and t2 in notes[0] and t1 in notes[0], err
    assert not out.exists()
