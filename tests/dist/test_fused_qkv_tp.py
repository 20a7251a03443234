"""Fused Q/K/V (and llama's gate/up) at TP=2 and under DeepSpeed ZeRO-3 (2 CPU ranks, one launch):
megatron-core's ColumnParallelLinear semantics reproduced for the concatenated weights."""

from __future__ import annotations

import json
import os

import pytest
from conftest import REPO, torchrun


def test_fused_qkv_tp2_and_zero3(tmp_path):
    """On both ranks, for gpt2 MHA, llama GQA (2 K/V heads, split over TP) and llama with 1 K/V head (tp 2 > 1:
    the gather_kv path): fused vs unfused logits, loss and every parameter's gradient within 1e-6 (fp32), the
    q/k/v and gate/up gradients non-zero; one attention's backward all-reduces its input gradient once fused
    instead of three times (with gather_kv: 2 instead of 5, K and V gathered together). ZeRO-3 at DP=2 (the
    parameters gathered by DeepSpeed although the fused path reads them outside their own layers' forward):
    3 training steps' losses fused vs unfused within 1e-6."""
    r = torchrun(2, [os.path.join(REPO, "tests", "dist", "fused_qkv_worker.py"), str(tmp_path)], timeout=900)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    with open(tmp_path / "result.json") as f:
        ranks = json.load(f)
    assert len(ranks) == 2
    for res in ranks:
        for name in ("gpt2", "llama-gqa2", "llama-kv1-gather"):
            c = res[name]
            assert c["gather_kv"] == (name == "llama-kv1-gather"), (name, c)
            assert c["logits_diff"] <= 1e-6 and c["loss_diff"] <= 1e-6 and c["grad_diff"] <= 1e-6, (name, c)
            assert c["qkv_grad_min_abs_max"] > 0 and c["n_qkv"] >= 6, (name, c)
            expect = {"False": 5, "True": 2} if c["gather_kv"] else {"False": 3, "True": 1}
            assert c["all_reduces_backward"] == expect, (name, c)
        z = res["zero3"]
        assert len(z["fused"]) == 3 and all(abs(a - b) <= 1e-6 for a, b in zip(z["fused"], z["unfused"])), z
        assert z["fused"][0] > 5.0  # an untrained model on 300 tokens: about ln(300) = 5.7


@pytest.mark.slow
def test_compiled_blocks_at_tp2_match_eager(tmp_path):
    """TP=2 ZeRO-1 engine, llama with 1 K/V head (the K/V all-gather and the fused input-gradient all-reduce
    inside the compiled block): 3 steps with every block compiled equal eager within 1e-5 on both ranks, and
    dynamo traced the blocks without a graph break (about a minute: inductor on CPU)."""
    r = torchrun(2, [os.path.join(REPO, "tests", "dist", "fused_qkv_worker.py"), str(tmp_path), "compile"], timeout=900)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    with open(tmp_path / "result.json") as f:
        ranks = json.load(f)
    for res in ranks:
        e, c = res["eager"], res["compiled"]
        assert e["graphs"] == 0 and c["graphs"] >= 1 and c["graph_breaks"] == 0, res
        assert all(abs(a - b) <= 1e-5 for a, b in zip(c["losses"], e["losses"])) and len(c["losses"]) == 3, res
