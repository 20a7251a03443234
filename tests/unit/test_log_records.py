"""log.jsonl has one reader (fsutil.read_records) with one rule: a last line without its newline is a
record cut short by a kill, even where its bytes happen to parse, and every reader leaves it out."""

from __future__ import annotations

import json

from megagrow.fsutil import read_records


def _log(path, steps, tail: str):
    recs = [{"stage": "s", "step": i, "loss": 1.0 / i, "time": float(i)} for i in steps]
    recs.append({"stage": "s", "step": steps[-1], "eval_loss": 2.0, "at": "periodic", "time": float(steps[-1])})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return recs


def test_every_log_reader_leaves_out_an_unterminated_last_line(tmp_path):
    """The last line parses but has no newline (the kill came between the record and its newline):
    read_records, the savings report, the run plot, `megagrow status`'s eval loss and the resume trim
    all see the same records without it."""
    from megagrow.controller.progress import last_eval_loss
    from megagrow.metrics.plot import read_run
    from megagrow.results.savings import _records
    from megagrow.train.log import trim_log

    log = tmp_path / "run" / "s" / "log.jsonl"
    recs = _log(log, [1, 2, 3], json.dumps({"stage": "s", "step": 4, "eval_loss": 9.0, "at": "periodic"}))
    assert read_records(str(log)) == recs
    assert _records(str(log)) == recs
    assert read_run(str(tmp_path / "run")) == [("s", recs)]
    assert last_eval_loss(str(log)) == 2.0
    trim_log(str(log), 10)
    assert log.read_text() == "".join(json.dumps(r) + "\n" for r in recs)


def test_garbage_and_missing_files_have_no_records(tmp_path):
    """A line that is not a JSON object is left out; a missing file has no records."""
    p = tmp_path / "log.jsonl"
    p.write_bytes(b'{"step": 1}\n[1, 2]\n\xff\xfe garbage\n{"step": 2}\n{"step": 3, "lo')
    assert read_records(str(p)) == [{"step": 1}, {"step": 2}]
    assert read_records(str(tmp_path / "missing.jsonl")) == []
