"""Resume after a kill without a signal: log records past the resumed checkpoint are dropped."""

import json

from megagrow.train.log import trim_log


def test_trim_log_keeps_steps_up_to_the_checkpoint(tmp_path):
    """Steps 1..7 logged, checkpoint at 5: after trimming, exactly steps 1..5 remain (a torn line is dropped)."""
    p = tmp_path / "log.jsonl"
    p.write_text("".join(json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in range(1, 8)) + '{"step": 8, "lo')
    trim_log(str(p), 5)
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == [1, 2, 3, 4, 5]
    trim_log(str(tmp_path / "missing.jsonl"), 3)  # nothing to trim: no error
