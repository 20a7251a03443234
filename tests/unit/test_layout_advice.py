"""Layout advice at plan validation (ZeRO-2 at DP=1; TP>1 where the model fits one device, given a
device_memory_gb hint) and the gradient-reduction overlap defaults of megagrow.parallel.engine."""

from __future__ import annotations

import pytest

from megagrow.config import Layout, ModelConfig, Plan, Stage, load_plan, plan_warnings, stage_warnings
from megagrow.errors import UserError

M1B = ModelConfig(flavour="llama", n_layers=24, d_model=2048, n_heads=16, vocab_size=50257, seq_len=2048)  # 1.32B


def test_zero2_at_dp1_warns():
    assert any("zero_stage 2 at dp 1" in w for w in stage_warnings(Stage(layout=Layout(dp=1, zero_stage=2))))
    for lay in (Layout(dp=1, zero_stage=1), Layout(dp=2, zero_stage=2), Layout(dp=1, zero_stage=3)):
        assert stage_warnings(Stage(layout=lay)) == []


def test_tp_where_the_model_fits_one_device_warns_only_with_the_hint():
    s = Stage(model=M1B, layout=Layout(tp=2, dp=4, zero_stage=1, dtype="bf16"))
    assert stage_warnings(s) == []  # device memory unknown: the check is skipped
    (w,) = stage_warnings(s.replace(device_memory_gb=80))  # 1.32B x 18 B = 23.7 GB <= 40 GB
    assert w.startswith("tp 2:") and "23.7 GB" in w and "80 GB" in w
    assert stage_warnings(s.replace(device_memory_gb=40)) == []  # 23.7 GB > half of 40 GB
    assert stage_warnings(s.replace(layout=s.layout.replace(tp=1, dp=8), device_memory_gb=80)) == []
    with pytest.raises(UserError, match="device_memory_gb"):
        Stage.from_dict({"device_memory_gb": 0})


def test_load_plan_prints_the_warnings_once(tmp_path, capsys, monkeypatch):
    import json

    d = {"name": "p", "stages": [{"name": "a", "layout": {"dp": 1, "zero_stage": 2}}, {"name": "b", "layout": {"zero_stage": 1}}]}
    f = tmp_path / "p.yaml"
    f.write_text(json.dumps(d))
    monkeypatch.delenv("RANK", raising=False)
    plan = load_plan(str(f))
    err = capsys.readouterr().err
    assert plan_warnings(plan) == [w for w in plan_warnings(Plan.from_dict(d))] and len(plan_warnings(plan)) == 1
    assert err.count("warning:") == 1 and "stage a: zero_stage 2 at dp 1" in err
    monkeypatch.setenv("RANK", "1")  # a launched rank other than 0 stays quiet
    load_plan(str(f))
    assert capsys.readouterr().err == ""


def test_overlap_defaults_by_layout():
    from megagrow.parallel.engine import ds_config

    def zo(lay, **kw):
        return ds_config(Stage(model=M1B, layout=lay), **kw)["zero_optimization"]

    big = {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 40_000_000, "allgather_bucket_size": 40_000_000}
    assert zo(Layout(dp=32, zero_stage=2, dtype="bf16"), overlap=True) == {"stage": 2, **big}
    assert zo(Layout(dp=8, zero_stage=1), overlap=True) == {"stage": 1, **big}
    assert zo(Layout(dp=64, zero_stage=1), overlap=True)["reduce_bucket_size"] == 64_000_000  # Megatron: 1e6 x dp
    assert zo(Layout(dp=32, zero_stage=1, dtype="bf16"), overlap=True) == {"stage": 1}  # BF16_Optimizer: no overlap
    assert zo(Layout(dp=1, zero_stage=2), overlap=True) == {"stage": 2}
    assert zo(Layout(dp=4, zero_stage=3), overlap=True) == {"stage": 3}
    assert zo(Layout(dp=8, zero_stage=2)) == {"stage": 2}  # auto: CPU/gloo gets none
    tiny = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=512)
    assert (
        ds_config(Stage(model=tiny, layout=Layout(dp=2, zero_stage=2)), overlap=True)["zero_optimization"]["reduce_bucket_size"]
        == tiny.num_params()
    )  # at most the model: one bucket
    js = ds_config(Stage(model=M1B, layout=Layout(dp=8, zero_stage=2, ds_config="ds_configs/zero2.json")), overlap=True)
    assert js["zero_optimization"]["reduce_bucket_size"] == 50_000_000  # the stage's JSON wins
