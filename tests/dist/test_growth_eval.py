"""The eval right after growth, with DeepSpeed's default config (one launch, 2 CPU ranks)."""

from __future__ import annotations

import json
import os

from conftest import REPO, torchrun

from megagrow.errors import EXIT_NONFINITE


def test_growth_eval_finite_and_unchanged_at_every_zero_stage(data_prefix, tmp_path):
    """A loss-preserving growth (depth x2) into ZeRO-1/2/3 x (TP1 x DP2, TP2 x DP1) with no ds_config
    (ZeRO-3 keeps parameters under 1e5 elements whole on every rank): the eval right after growth is
    finite and equals the source's final eval within 1e-6 (gpt2; llama at ZeRO-3); at ZeRO-3 DP=2 the
    grown engine's first step has the loss a fresh engine loading the transition's checkpoint has.
    A non-finite eval at growth stops the stage before its first step: NonFinite (exit code
    EXIT_NONFINITE), one line naming the growth."""
    r = torchrun(2, [os.path.join(REPO, "tests", "dist", "growth_eval_worker.py"), data_prefix, str(tmp_path)], timeout=1200)
    assert r.returncode == 0, f"worker failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    with open(tmp_path / "result.json") as f:
        res = json.load(f)
    cases = res["cases"]
    assert len(cases) == 8, sorted(cases)
    for key, c in cases.items():
        assert "error" not in c and c["rc"] == 0, (key, c)
        before, after = c["evals"]["before_growth"], c["evals"]["after_growth"]
        assert abs(after - before) < 1e-6, (key, before, after)
        assert len(c["loss"]) == 1, (key, c)
        if "z3" in key and "dp2" in key:
            assert c["loss"] == c["loss_loaded"], (key, c)
    nan = res["nan"]
    assert nan.get("type") == "NonFinite" and nan["exit_code"] == EXIT_NONFINITE, nan
    assert "\n" not in nan["error"] and "eval loss nan" in nan["error"] and "s0 -> s1" in nan["error"], nan
    assert nan["train_records"] == [], nan
