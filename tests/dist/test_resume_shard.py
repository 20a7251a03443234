"""Resume through the shard reader (megagrow.state.resume.resume_engine), against DeepSpeed's
engine.load_checkpoint, for real on 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os

from conftest import REPO, torchrun


def test_shard_reader_resume_is_bitwise_load_checkpoint(data_prefix, tmp_path):
    """At ZeRO-1/2/3 with DP=2 and at TP=2 (ZeRO-1/2/3), fp32 and bf16: a checkpoint resumed through the shard
    reader gives bitwise the state engine.load_checkpoint gives: fp32 master partitions, exp_avg, exp_avg_sq,
    Adam's step, module weights (bf16/fp32; ZeRO-3 partitions and persistent whole parameters), DeepSpeed's
    step/sample counters and the stage record; the next step (dropout on) gives a bitwise equal loss and fp32
    master. Each rank opens only the metadata file and its own optimizer file, and checksums exactly its own
    optimizer file (rank 0 also the metadata file): never the other TP rank's module file."""
    r = torchrun(2, [os.path.join(REPO, "tests", "dist", "resume_shard_worker.py"), data_prefix, str(tmp_path)], timeout=1200)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    res = json.load(open(tmp_path / "result.json"))
    assert len(res) == 7
    for key, ranks in res.items():
        tp = int(key[2])
        z3 = "-z3-" in key
        for rank, got in enumerate(ranks):
            assert got["mismatched"] == [] and got["compared"] > 10, (key, rank, got)
            assert got["next_step_equal"], (key, rank)
            assert got["adam_step"] == 3.0, (key, rank, got)
            d, t = divmod(rank, tp)
            prefix = "bf16_" if key.endswith("bf16") else ""
            own = f"{prefix}zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt"
            meta = "zero_pp_rank_0_mp_rank_00_model_states.pt" if z3 else "mp_rank_00_model_states.pt"
            assert got["opened"] == [meta, own], (key, rank, got["opened"])
            assert got["verified"] == ([meta, own] if rank == 0 else [own]), (key, rank, got["verified"])
            assert got["bytes_read"] > 0
