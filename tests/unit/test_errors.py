"""The errors a CLI reports as one line: a user's mistake (UserError) and a run that failed through
no mistake of the user's (RunFailure: a checkpoint that could not be written, a diverged stage) are
different classes with the exit codes the controller keys on; `megagrow train` marks the stage
failed in its status.json for a RunFailure only."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from megagrow.errors import (
    EXIT_FAILED,
    EXIT_NONFINITE,
    EXIT_USER_ERROR,
    MegagrowError,
    NonFinite,
    RunFailure,
    SaveFailed,
    UserError,
    cli_entry,
)


def test_the_hierarchy_and_its_exit_codes():
    assert not issubclass(SaveFailed, UserError) and not issubclass(NonFinite, UserError)
    assert issubclass(SaveFailed, RunFailure) and issubclass(NonFinite, RunFailure) and issubclass(UserError, MegagrowError)
    assert (UserError("x").exit_code, SaveFailed("x").exit_code, NonFinite("x").exit_code) == (
        EXIT_USER_ERROR,
        EXIT_USER_ERROR,
        EXIT_NONFINITE,
    )
    assert (EXIT_FAILED, EXIT_USER_ERROR, EXIT_NONFINITE) == (1, 2, 3)
    assert NonFinite("x").all_ranks and not SaveFailed("x").all_ranks


@pytest.mark.parametrize(
    "exc,code",
    [
        (UserError("bad config"), 2),
        (SaveFailed("could not write checkpoint c (No space)"), 2),
        (NonFinite("stage a: loss nan at step 3"), 3),
    ],
)
def test_cli_entry_prints_one_line_with_the_exit_code(capsys, monkeypatch, exc, code):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)

    def fail():
        raise exc

    assert cli_entry(fail)() == code
    err = capsys.readouterr().err
    assert err == f"error: {exc}\n"
    monkeypatch.setenv("RANK", "1")  # an error every rank raises alike: rank 0 alone prints it
    assert cli_entry(fail)() == code
    assert capsys.readouterr().err == ("" if exc.all_ranks else f"error: {exc}\n")


@pytest.mark.parametrize(
    "exc,code,marked",
    [
        (SaveFailed("could not write checkpoint (No space left on device)"), 2, True),
        (NonFinite("stage a: loss nan at step 3"), 3, True),
        (UserError("stage a: cannot load checkpoint"), 2, False),
    ],
)
def test_train_marks_the_stage_failed_for_a_run_failure_only(tmp_path, monkeypatch, capsys, exc, code, marked):
    import megagrow.signals
    import megagrow.train
    from megagrow.cli import main

    for k in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(megagrow.signals, "install_early", lambda: None)

    def train_stage(*a, **k):
        raise exc

    monkeypatch.setattr(megagrow.train, "train_stage", train_stage)
    plan = {
        "name": "p",
        "seed": 1,
        "data": {"prefix": str(tmp_path / "none")},
        "stages": [
            {
                "name": "a",
                "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "vocab_size": 512, "seq_len": 16},
                "layout": {"tp": 1, "dp": 1, "zero_stage": 1, "micro_batch": 2},
            }
        ],
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    run = tmp_path / "run"
    os.makedirs(run / "a")
    (run / "a" / "status.json").write_text(json.dumps({"state": "running", "step": 2}))
    assert main(["train", str(tmp_path / "plan.yaml"), "--stage", "a", "--run-dir", str(run)]) == code
    assert capsys.readouterr().err.count("error:") == 1
    st = json.loads((run / "a" / "status.json").read_text())
    assert (st["state"] == "failed") is marked
