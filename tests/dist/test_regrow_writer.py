"""The offline regrow writer (megagrow/state/writer.py) against DeepSpeed's own save, on CPU/gloo."""

from __future__ import annotations

import json
import os

from conftest import REPO, torchrun


def test_offline_writer_equals_engine_save_bitwise(data_prefix, tmp_path):
    """For ZeRO-1, ZeRO-2 (bf16), ZeRO-1 bf16 (BF16_Optimizer), ZeRO-3 (fp32; bf16 with an untied llama),
    a TP=2 target and a depth x2 growth, the same source regrown by the engine path (`regrow`) and by
    the offline writer (`regrow_offline`): every file of the two outputs holds the same objects (keys in
    order, types, tensor dtype/shape/requires_grad, values bitwise); loaded by a real DeepSpeed engine
    (`engine.load_checkpoint`), every rank's module weights, fp32 master, exp_avg, exp_avg_sq, Adam step
    and DeepSpeed counters are bitwise equal, the client state (megagrow's record) equal, and one
    training step after the load gives bitwise equal losses (and the forward after it)."""
    r = torchrun(2, [os.path.join(REPO, "tests", "dist", "regrow_writer_worker.py"), data_prefix, str(tmp_path)], timeout=900)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    with open(tmp_path / "result.json") as f:
        res = json.load(f)
    assert set(res) == {"zero1", "zero2-bf16", "zero1-bf16", "zero3", "tp2", "depth-x2-zero1", "llama-untied-zero3-bf16",
                        "llama-untied-zero2"}
    for name, c in res.items():
        assert c["file_diff"] == [], (name, c["file_diff"])
        assert c["adam_step"] == 2, name
        for rank in c["ranks"]:
            assert rank["state_diff"] == [], (name, rank)
            assert rank["tensors"] >= 4 * 2 + 20, (name, rank)  # module weights + fp32/exp_avg/exp_avg_sq/step per group
            # a reshard goes on at the source's step 2; a grown stage starts at its step 0
            assert rank["client_equal"] and rank["record_step"] == (0 if name.startswith("depth") else 2), (name, rank)
            la, lb = rank["losses"]
            assert la == lb and len(la) == 3, (name, rank)
