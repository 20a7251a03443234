"""The heartbeat's age is measured by watching it change on the watcher's own clock, never by subtracting
a timestamp stamped by the writer's host: a writer whose clock is an hour off neither looks hung nor
looks fresh forever (megagrow.fsutil.HeartbeatWatch, observed_age; megagrow.procs.wait_ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from megagrow import procs
from megagrow.fsutil import Heartbeat, HeartbeatWatch, observed_age

HOUR = 3600.0


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _beat(path: str, hb: Heartbeat, stamp: float) -> None:
    """One beat by a writer whose clock says `stamp` (its mtime is what that host would set)."""
    hb.beat(force=True)
    os.utime(path, (stamp, stamp))


@pytest.mark.parametrize("skew", [HOUR, -HOUR])
def test_watch_age_ignores_the_writers_clock(tmp_path, skew):
    """Property: with the writer's stamps an hour ahead or behind, the watch's age is exactly the time since
    the file last changed on the watcher's clock: 0 right after a beat, 7.5 after 7.5 s without one (not 0
    forever, not an hour)."""
    path, clock = str(tmp_path / "heartbeat"), Clock()
    hb = Heartbeat(path)
    _beat(path, hb, time.time() + skew)
    watch = HeartbeatWatch(path, clock=clock)
    assert watch.age() == 0.0
    clock.t += 7.5
    assert watch.age() == 7.5  # no beat: it ages on the watcher's clock
    _beat(path, hb, time.time() + skew)
    assert watch.age() == 0.0  # it changed: fresh
    clock.t += 2.0
    assert watch.age() == 2.0


def test_a_beat_changes_the_signature_even_with_the_same_mtime(tmp_path):
    """Property: a beat is seen even where the mtime does not move (a writer clock stuck, a coarse file
    system timestamp): the file's content (a beat counter) changes."""
    path = str(tmp_path / "heartbeat")
    hb = Heartbeat(path)
    _beat(path, hb, 5000.0)
    before = Heartbeat.signature(path)
    _beat(path, hb, 5000.0)
    after = Heartbeat.signature(path)
    assert before[1] == after[1] and before != after


@pytest.mark.parametrize("skew", [HOUR, -HOUR])
def test_status_age_from_observations_not_the_remote_stamp(tmp_path, skew):
    """Property (`megagrow status`): with no earlier observation a stamp in the future reads as 0 s (never
    negative) and a stamp in the past as its age, once; from then on the age is the file-system time since
    the heartbeat last changed as observed: 30 s after the last observation with no beat in between, 0 right
    after a beat; an observation published by the watchdog (age 12 s) is what status goes on from."""
    path = str(tmp_path / "heartbeat")
    hb = Heartbeat(path)
    now = time.time()
    _beat(path, hb, now + skew)
    first = observed_age(path, now)
    assert first == (0.0 if skew > 0 else pytest.approx(HOUR, abs=1))
    assert observed_age(path, now + 30) == pytest.approx(first + 30)  # unchanged: it ages, not fresh forever
    _beat(path, hb, now + skew + 40)
    assert observed_age(path, now + 40) == 0.0  # changed since the last look: fresh, and recorded now
    assert observed_age(path, now + 70) == pytest.approx(30.0)  # not an hour, not 0 forever
    clock = Clock()
    watch = HeartbeatWatch(path, clock=clock)
    _beat(path, hb, now + skew + 80)
    watch.age()
    clock.t += 12.0
    assert watch.age() == 12.0
    watch.publish(now + 100)
    assert observed_age(path, now + 105) == pytest.approx(17.0)


def _writer(hb: str, skew: float, beats: int) -> list[str]:
    """A rank-0 stand-in whose host clock is `skew` s off: `beats` beats 0.2 s apart, then it sleeps."""
    code = (
        f"import os, time\nfrom megagrow.fsutil import Heartbeat\nh = Heartbeat({hb!r})\n"
        f"for _ in range({beats}):\n    h.beat(force=True); t = time.time() + {skew}; os.utime({hb!r}, (t, t)); time.sleep(0.2)\n"
        f"time.sleep(30)"
    )
    return [sys.executable, "-c", code]


@pytest.mark.parametrize("skew", [HOUR, -HOUR])
def test_watchdog_with_a_skewed_writer(tmp_path, skew):
    """Property (the controller's hang watchdog, hang_s 2): a writer an hour ahead or behind that keeps
    beating for 4 s is not declared hung (an hour-old stamp is not a hang), and once it stops beating it is
    declared hung within hang_s plus the check interval (a stamp an hour ahead is not fresh forever)."""
    hb = str(tmp_path / "heartbeat")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    t0 = time.monotonic()
    p = subprocess.Popen(_writer(hb, skew, 20), env=env)
    res = procs.wait_ranks([p], grace_s=1, poll_s=0.05, heartbeat=hb, hang_s=2.0)
    took = time.monotonic() - t0
    assert res.hung_s is not None and 2.0 < res.hung_s < 3.5, res
    assert took > 4.0 + 2.0, took  # it beat for 4 s: not hung while it did
    assert os.path.exists(hb + ".seen")  # the observation status reads
