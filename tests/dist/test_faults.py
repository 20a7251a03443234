"""Fault injection (CPU, gloo, real processes): kill -9 one rank or every rank at chosen points of a
training save (between one rank's files and another's, before/after the checksums, between the
manifest and `latest`), of a stage transition and of tools/regrow.py; then run again.

Each trial asserts: the newest complete checkpoint the kill left has every checksum right (a torn
save is never taken: it is skipped); the rerun resumes from exactly that checkpoint and finishes;
every fp32 weight, exp_avg and exp_avg_sq of the final checkpoint, and every logged loss, equal an
uninterrupted run's bitwise. Trials are seeded (MEGAGROW_FAULT_SEED); `pytest --trials N` or
MEGAGROW_FAULT_TRIALS_SCALE=K runs more (`make stress`). The ranks of a launch are forked from one
process that imported torch once (tests/dist/fault_worker.py), so a trial costs seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, _env

DEFAULT = {"save": 12, "transition": 5, "regrow": 4}  # 21 trials in the normal suite


def _trials(request, suite: str) -> int:
    n = request.config.getoption("--trials") or DEFAULT[suite]
    return n * int(os.environ.get("MEGAGROW_FAULT_TRIALS_SCALE", "1"))


def _run(suite: str, n: int, data: str, out) -> dict:
    seed = int(os.environ.get("MEGAGROW_FAULT_SEED", "0"))
    r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "dist", "fault_worker.py"), suite, data, str(out), str(n),
                        str(seed)], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=1800)
    log = out / "ranks.log"
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}\n{log.read_text()[-3000:] if log.exists() else ''}"
    with open(out / "result.json") as f:
        return json.load(f)


def _check_train_trials(res: dict, n: int) -> None:
    trials = res["trials"]
    assert len(trials) == n
    for t in trials:
        assert t["killed"], t  # the fault fired: at least one rank died by SIGKILL
        assert t["left"]["tag"] is None or t["left"]["checksums_ok"], t
        assert t["rerun_codes"] == [0, 0], t
        assert t["resumed_at"] == t["expected_resume"], t
        assert t["mismatched"] == [] and t["losses_equal"], t
        survivors = [c for c in t["fault_codes"] if c != -9]
        # a survivor stops with the one-line "lost contact" exit, or finishes if the kill came after its last collective
        assert all(c in (74, 0) for c in survivors), t


def test_kill_during_training_saves_resumes_bitwise(data_prefix, tmp_path, request):
    """kill -9 of rank 0, rank 1 or both at random save points and steps (seeded): every rerun resumes
    from the newest complete checkpoint and ends bitwise equal (weights, both moments, losses) to the
    uninterrupted run; at least one trial left a torn newer save that was skipped."""
    n = _trials(request, "save")
    res = _run("save", n, data_prefix, tmp_path)
    _check_train_trials(res, n)
    assert any(t["left"]["skipped"] for t in res["trials"])  # a torn save existed and was not taken
    stops = [t["peer_stop_s"] for t in res["trials"] if t["peer_stop_s"] is not None and -9 in t["fault_codes"] and len(set(t["fault_codes"])) > 1]
    print(f"faults/save: {n} trials in {res['seconds']} s; survivors stopped {min(stops):.2f}-{max(stops):.2f} s after the kill")


def test_kill_during_transition_resumes_bitwise(data_prefix, tmp_path, request):
    """kill -9 during the growth transition into stage b (after the grown files, during/after the seal,
    before the rename) and during b's first save: the rerun redoes or keeps the transition and ends
    bitwise equal to the uninterrupted run."""
    n = _trials(request, "transition")
    res = _run("transition", n, data_prefix, tmp_path)
    _check_train_trials(res, n)


def test_kill_during_regrow_reruns_bitwise(data_prefix, tmp_path, request):
    """kill -9 during tools/regrow.py's seal or before its rename: no output directory appears (or a
    complete one); the rerun writes an output equal bitwise to an uninterrupted regrow, sealed."""
    n = _trials(request, "regrow")
    res = _run("regrow", n, data_prefix, tmp_path)
    assert len(res["trials"]) == n
    for t in res["trials"]:
        assert t["killed"] and not t["left"]["out_exists"], t
        assert t["rerun_codes"] == [0, 0] and t["mismatched"] == [] and t["sealed"], t
