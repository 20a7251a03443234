"""fsutil: atomic writes leave the old file or the whole new one and no temp file; the exclusive lock
refuses a second holder and, where the file system cannot lock, says so instead of failing."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from megagrow.fsutil import try_exclusive_lock, write_file_atomic, write_json_atomic


def test_write_file_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    """A write that fails half way (ENOSPC from os.replace here) leaves the old content and no temp file."""
    p = tmp_path / "f.txt"
    write_file_atomic(str(p), "old", durable=True)
    assert p.read_text() == "old"

    def boom(a, b):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_json_atomic(str(p), {"new": 1})
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_exclusive_lock_refuses_a_second_holder_and_reports_no_flock(tmp_path, monkeypatch):
    """flock conflicts between two open file descriptions, also in one process: the second attempt is
    "held"; after the first is closed it can be taken. Where flock fails (ENOLCK: a network file
    system without flock) the result is (None, a reason naming the path), not an exception."""
    path = str(tmp_path / ".lock")
    f1, why1 = try_exclusive_lock(path)
    assert f1 is not None and why1 == ""
    f2, why2 = try_exclusive_lock(path)
    assert f2 is None and why2 == "held"
    f1.close()
    f3, why3 = try_exclusive_lock(path)
    assert f3 is not None and why3 == ""
    f3.close()

    def no_flock(f, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    f4, why4 = try_exclusive_lock(path)
    assert f4 is None and path in why4 and "No locks available" in why4


def test_controller_lock_warns_where_the_file_system_cannot_lock(tmp_path, monkeypatch, capsys):
    from megagrow.controller.run import lock_run_dir
    from megagrow.errors import UserError

    run = str(tmp_path / "run")
    held = lock_run_dir(run)
    with pytest.raises(UserError, match="another `megagrow run` is working on"):
        lock_run_dir(run)
    held.close()

    monkeypatch.setattr(fcntl, "flock", lambda f, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "No locks available")))
    assert lock_run_dir(run) is None
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "cannot be locked" in err and "second `megagrow run`" in err


def test_publish_dir_is_all_or_nothing(tmp_path):
    """Property: a directory built under publish_dir appears at `out` whole when the block ends (an empty
    `out` is replaced), and a failure inside the block leaves neither `out` nor the temporary directory."""
    import pytest

    from megagrow.fsutil import publish_dir

    out = tmp_path / "model"
    out.mkdir()
    with publish_dir(str(out)) as tmp:
        assert tmp == str(tmp_path / "model.export-tmp")
        (tmp_path / "model.export-tmp" / "a.txt").write_text("x")
        assert not (out / "a.txt").exists()
    assert (out / "a.txt").read_text() == "x" and not (tmp_path / "model.export-tmp").exists()
    other = tmp_path / "other"
    with pytest.raises(RuntimeError), publish_dir(str(other)) as tmp:
        (tmp_path / "other.export-tmp" / "b.txt").write_text("y")
        assert os.path.isfile(os.path.join(tmp, "b.txt"))
        raise RuntimeError("disk full")
    assert not other.exists() and not (tmp_path / "other.export-tmp").exists()
