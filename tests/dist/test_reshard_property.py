"""R1: the reshard property test. Random (model, layout A, layout B, dtype) cases; each converts a
checkpoint trained at A into B shard to shard (identity regrow) and compares every fp32 weight and
both Adam moments bitwise. `pytest --cases N` (or MEGAGROW_R1_CASES) sets the count: 200 in the normal
suite (about 3 minutes on 2 CPU cores: many targets per source, few process launches), 600 in
`make stress`."""

from __future__ import annotations

import os

from conftest import run_worker


def test_reshard_random_cases_bitwise(data_prefix, tmp_path, request, monkeypatch):
    """For each random case: every fp32 master weight, exp_avg and exp_avg_sq of the checkpoint resharded
    to layout B equals layout A's bitwise (torch.equal on the logical tensors); all three states are
    compared for every tensor; the cases cover TP 1<->2, ZeRO 1/2/3 and fp32/bf16 on both sides."""
    n = request.config.getoption("--cases") or int(os.environ.get("MEGAGROW_R1_CASES", "200"))
    monkeypatch.setenv("MEGAGROW_R1_CASES", str(n))
    res = run_worker(2, "reshard_property", data_prefix, tmp_path)
    cases = res["cases"]
    assert len(cases) == n
    bad = [c for c in cases if c["mismatched"]]
    assert not bad, bad[:3]
    assert all(c["states"] == ["m", "v", "w"] and c["tensors"] >= 3 * 4 for c in cases)
    seen = {(c["a"]["tp"], c["b"]["tp"]) for c in cases}, {c["b"]["zero_stage"] for c in cases}, {c["b"]["dtype"] for c in cases}
    if n >= 30:
        assert seen[0] >= {(1, 2), (2, 1)} and seen[1] == {1, 2, 3} and seen[2] == {"fp32", "bf16"}, seen
    print(f"R1: {n} cases bitwise in {res['seconds']:.1f} s (worker wall time)")
