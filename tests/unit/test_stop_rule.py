"""The `stop: {rule: slope}` stage field: config, default thresholds, the in-loop rule on a
synthetic curve with a known crossing, and replay from log.jsonl after a resume."""

from __future__ import annotations

import json
import math

import pytest

from megagrow.config import Plan
from megagrow.errors import UserError
from megagrow.schedule.slope import DEPTH_GROW_SLOPE, STOP_SLOPE, WIDTH_GROW_SLOPE
from megagrow.schedule.stop import StageStop, slope_threshold


def _plan(stop0=None, stop1=None, grow1="width") -> Plan:
    m0 = {"n_layers": 1, "d_model": 32, "n_heads": 2, "vocab_size": 512, "seq_len": 16}
    m1 = dict(m0, d_model=64, n_heads=4) if grow1 == "width" else dict(m0, n_layers=2)
    s0 = {"name": "a", "model": m0, "layout": {"dp": 2}, "steps": 200, "log_every": 1}
    s1 = {"name": "b", "grow": grow1, "model": m1, "layout": {"dp": 2}, "steps": 100}
    if stop0:
        s0["stop"] = stop0
    if stop1:
        s1["stop"] = stop1
    return Plan.from_dict({"name": "p", "stages": [s0, s1]})


def test_stop_config_defaults_round_trip_and_errors():
    p = _plan()
    assert p.stages[0].stop.rule == "steps" and StageStop.of(p, 0) is None
    p = _plan({"rule": "slope", "min_steps": 20, "window": 5})
    assert Plan.from_dict(p.to_dict()) == p
    for bad, needle in [({"rule": "loss"}, "rule must be one of"), ({"rule": "slope", "window": 1}, "window must be"),
                        ({"rule": "slope", "min_steps": 500}, "min_steps 500 > steps 200"),
                        ({"rule": "slope", "thresh": 1}, "unknown key(s) thresh")]:
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            _plan(bad)


def test_default_thresholds_follow_the_next_operator():
    assert slope_threshold(_plan({"rule": "slope"}, grow1="width"), 0) == WIDTH_GROW_SLOPE
    assert slope_threshold(_plan({"rule": "slope"}, grow1="depth"), 0) == DEPTH_GROW_SLOPE
    assert slope_threshold(_plan(stop1={"rule": "slope"}), 1) == STOP_SLOPE
    assert slope_threshold(_plan({"rule": "slope", "threshold": -0.1}), 0) == -0.1


def _kinked(stop: StageStop, kink: int, n: int) -> list[float]:
    """log10 L linear in log10 C: slope -0.1 up to step `kink`, -0.02 after (the curve flattens)."""
    out = []
    for s in range(1, n + 1):
        x = math.log10(stop.compute(s))
        x0 = math.log10(stop.compute(kink))
        y = 0.8 - 0.1 * (min(x, x0) - math.log10(stop.compute(1))) - 0.02 * max(0.0, x - x0)
        out.append(10 ** y)
    return out


def test_rule_ends_the_stage_at_the_known_crossing():
    plan = _plan({"rule": "slope", "threshold": -0.05, "window": 4})
    stop = StageStop(plan, 0)
    losses = _kinked(stop, kink=60, n=200)
    ended = next(s for s, loss in enumerate(losses, 1) if stop.update(s, loss))
    assert 61 <= ended <= 63  # a window of 4 sees the new slope fully 3 points after the kink
    # min_steps: the warm-up-like flat start cannot end the stage, and nothing fires before min_steps
    plan = _plan({"rule": "slope", "threshold": -0.05, "window": 4, "min_steps": 100})
    stop = StageStop(plan, 0)
    flat_then_kinked = [4.0] * 10 + _kinked(stop, kink=60, n=200)[10:]
    assert next(s for s, loss in enumerate(flat_then_kinked, 1) if stop.update(s, loss)) == 100


def test_replay_from_the_log_matches_the_online_rule(tmp_path):
    plan = _plan({"rule": "slope", "threshold": -0.05, "window": 4})
    online = StageStop(plan, 0, lr_offset=7)
    losses = _kinked(online, kink=60, n=200)
    log = tmp_path / "log.jsonl"
    with open(log, "w") as f:
        for s in range(1, 41):
            f.write(json.dumps({"stage": "a", "step": s, "loss": losses[s - 1]}) + "\n")
        for s in range(31, 41):  # steps redone after a restart from an older checkpoint: logged twice
            f.write(json.dumps({"stage": "a", "step": s, "loss": losses[s - 1]}) + "\n")
        f.write('{"stage": "a", "step": 41, "lo')  # a record cut short by a kill
    for s in range(1, 41):
        assert not online.update(s, losses[s - 1])
    resumed = StageStop.of(plan, 0, 7, str(log), upto=40)
    a = next(s for s in range(41, 201) if online.update(s, losses[s - 1]))
    b = next(s for s in range(41, 201) if resumed.update(s, losses[s - 1]))
    assert a == b and 61 <= a <= 63
