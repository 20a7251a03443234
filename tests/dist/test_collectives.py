"""The GPU path without a GPU: every collective megagrow makes, with its groups declared NCCL."""

from __future__ import annotations

import json
import os

from conftest import run_worker


def test_save_resume_transition_regrow_on_declared_nccl(data_prefix, tmp_path):
    """The trainer's save, resume (with checksum verification), width transition (TP 1 -> 2) and
    tools/regrow.py run with MEGAGROW_DECLARE_NCCL=1 under tests/dist/nccl_check.py: any tensor that
    reaches a declared-NCCL group from megagrow without being put on the device by megagrow.collectives
    raises (NCCL takes device tensors only: before, fp32_finite all-reduced a CPU tensor before every
    save and the regrow all-gathered CPU tensors after sealing). Metadata (object collectives) runs on
    the gloo side group."""
    res = run_worker(2, "nccl_declared", data_prefix, tmp_path)
    assert res["rcs"] == [0, 0, 0] and res["side_group_is_gloo"], res
    assert res["steps"] == {"s0": [1, 2], "s1": [1, 2]}, res
    out = tmp_path / "regrown"
    assert os.path.isfile(out / "latest") and not os.path.exists(f"{out}.regrow-tmp")
    for r in range(2):
        with open(tmp_path / f"seen_rank{r}.json") as f:
            seen = json.load(f)
        # the checker was on the paths it checks: tensor collectives on the declared group (the step's
        # reduction, fp32_finite before each save, the eval, the regrow's summary) and metadata on the side group
        assert seen.get("all_reduce@nccl", 0) >= 4 + 3 and seen.get("all_gather@nccl", 0) >= 1, seen
        for name in ("broadcast_object_list", "gather_object", "all_gather_object"):
            assert seen.get(f"{name}@gloo-side", 0) >= 1 and f"{name}@nccl" not in seen, seen
