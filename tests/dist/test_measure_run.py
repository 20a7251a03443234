"""Eval loss, the FLOP ledger and `megagrow bench`, for real on 2 CPU processes (two launches).
(Named apart from tests/unit/test_measure.py: pytest needs unique test module basenames here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_worker, torchrun


@pytest.fixture(scope="module")
def measured(data_prefix, tmp_path_factory):
    out = tmp_path_factory.mktemp("measure")
    return run_worker(2, "measure", data_prefix, out), out


def test_eval_loss_is_the_same_at_every_layout(measured):
    """The eval loss of the same weights at TP1xDP2 (ZeRO-2), TP2xDP1 (ZeRO-1), TP1xDP2 (ZeRO-3), each
    with another micro batch, equals a plain single-process loop over the window list within 1e-5."""
    res, _ = measured
    vals = res["layouts"]
    assert len(vals) == 4 and res["eval_windows"] == 128
    ref = vals["plain-single-process"]
    assert 5.0 < ref < 7.0  # an untrained model on a 512-token vocabulary: about ln(512) = 6.24
    for key, v in vals.items():
        assert abs(v - ref) < 1e-5, (key, v, ref)


def test_evals_do_not_disturb_training(measured):
    """Dropout on: the training losses with an eval every 2 steps are bitwise those of a run without evals
    (eval reads no training data and moves no RNG); evals at steps 2, 4 (periodic) and 6 (stage end)."""
    res, _ = measured
    d = res["disturb"]
    assert d["2"]["train"] == d["0"]["train"] and len(d["0"]["train"]) == 6
    assert d["2"]["evals"] == [[2, "periodic"], [4, "periodic"], [6, "stage_end"]] and d["0"]["evals"] == []


def test_eval_before_and_after_growth_equal_for_exact_operators(measured):
    """Through the trainer's real transitions (width at TP2, then depth at DP2 ZeRO-3, dropout 0.1 in
    training): the grown stage logs before_growth = the source's stage-end eval, and after_growth within
    1e-4 of it (fp32; only the layout's float rounding differs); the line is printed, with no warning."""
    res, _ = measured
    for prev, cur in (("s0", "s1"), ("s1", "s2")):
        end = [r for r in res["staged"][prev] if r.get("at") == "stage_end"]
        ev = {r["at"]: r for r in res["staged"][cur] if "eval_loss" in r and r["step"] == 0}
        assert len(end) == 1 and set(ev) == {"before_growth", "after_growth"}, (cur, ev)
        assert ev["before_growth"]["eval_loss"] == end[0]["eval_loss"]
        assert abs(ev["after_growth"]["eval_loss"] - ev["before_growth"]["eval_loss"]) < 1e-4, ev
        assert not any("loss" in r for r in ev.values())  # eval records carry eval_loss only
        line = [x for x in res["staged_printed"] if f"eval loss at growth {prev} -> {cur}:" in x]
        assert len(line) == 1 and "(delta " in line[0], res["staged_printed"]
    assert not any("WARNING" in x for x in res["staged_printed"])


def test_ledger_is_continuous_over_transitions_and_resume(measured):
    """tokens and flops of every record (training and eval) = the previous stages' totals + step x the
    stage's per-step amount: the grown stages start where the source ended, and s1 - stopped at step 2
    and resumed - goes on as if uninterrupted. Training records carry tflops_per_device, mfu (null on
    CPU), peak_mem_gb; TensorBoard events are written beside log.jsonl; status.json has the eval loss."""
    res, _ = measured
    tokens0 = flops0 = 0
    for name in ("s0", "s1", "s2"):
        dt, df = res["per_step"][name]
        recs = res["staged"][name]
        train = [r for r in recs if "loss" in r]
        assert [r["step"] for r in train] == list(range(1, len(train) + 1)), name  # resumed s1: no step twice
        for r in recs:
            assert (r["tokens"], r["flops"]) == (tokens0 + r["step"] * dt, flops0 + r["step"] * df), (name, r)
        for r in train:
            assert r["mfu"] is None and r["tflops_per_device"] > 0 and r["peak_mem_gb"] > 0.05
        last = train[-1]
        tokens0, flops0 = last["tokens"], last["flops"]
    assert res["tb_files"], "no TensorBoard event file in RUN/s0"
    st = res["s1_status"]
    assert st["eval_loss"] == [r for r in res["staged"]["s1"] if r.get("at") == "stage_end"][0]["eval_loss"]
    assert st["flops"] == res["staged"]["s1"][-1]["flops"]


def test_data_without_split_trains_with_eval_off_said_once(measured):
    res, _ = measured
    said = [x for x in res["bare_printed"] if "eval off" in x]
    assert len(said) == 1 and "no validation split" in said[0]
    assert [r["step"] for r in res["bare_records"]] == [1, 2] and not any("eval_loss" in r for r in res["bare_records"])


def test_plot_of_the_staged_run_writes_a_png(measured, tmp_path):
    """`megagrow plot` on the real staged run directory: a PNG, three stages, eval points from every stage."""
    _, out = measured
    png = tmp_path / "loss.png"
    r = subprocess.run([sys.executable, "-m", "megagrow.cli", "plot", str(out / "staged"), "--out", str(png), "--json"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["runs"][0]["stages"] == ["s0", "s1", "s2"] and info["runs"][0]["eval_points"] >= 7
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


BENCH_PLAN = """
name: benchtest
seed: 3
data: {{prefix: {prefix}}}
defaults:
  model: {{flavour: gpt2, n_layers: 2, d_model: 64, n_heads: 4, vocab_size: 512, seq_len: 32}}
stages:
  - name: small
    layout: {{tp: 1, dp: 2, zero_stage: 2, micro_batch: 2}}
  - name: wide
    grow: width
    model: {{d_model: 128, n_heads: 8}}
    layout: {{tp: 2, dp: 1, zero_stage: 1, micro_batch: 2, grad_accum: 2}}
"""

ROW_FIELDS = {"stage", "activation_checkpointing", "tp", "dp", "zero_stage", "micro_batch", "grad_accum", "dtype", "world_size", "params",
              "params_non_embedding", "tokens_per_step", "flops_per_token", "flops_per_token_megatron", "oom", "error",
              "device", "peak_mem_gb", "baseline", "steps", "warmup", "step_time_s", "step_time_p10_s", "step_time_p90_s",
              "tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "tflops_per_device_megatron", "peak_tflops",
              "mfu", "mfu_megatron", "loss_first", "loss_last", "phases_s", "baseline_step_time_s", "ratio",
              "baseline_phases_s", "step_cpu_time_s", "baseline_step_cpu_time_s", "cpu_time_ratio"}


def test_bench_json_on_cpu_has_every_field(data_prefix, tmp_path):
    """`megagrow bench --json` on 2 processes, stage 1 swept over tp=1,2 (dp 2 / 1), with --phases and
    --transition: every field present and sane; the DP=2 row has the torch DDP ratio; the TP=2 row has
    none; the transition and the same-layout resume are timed phase by phase."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(BENCH_PLAN.format(prefix=data_prefix))
    r = torchrun(2, ["-m", "megagrow.cli", "bench", str(plan), "--stage", "1", "--steps", "2", "--warmup", "1", "--block", "1",
                     "--sweep", "tp=1,2", "--phases", "--transition", "--json"], timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"plan", "stage", "device", "world_size", "synthetic", "convention", "rows", "transition"} <= set(res)
    assert "6*N_nonembedding + 12*L*attn_dim*seq_len" in res["convention"]
    dp2, tp2 = res["rows"]
    for row in (dp2, tp2):
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["oom"] is False and row["mfu"] is None and row["peak_tflops"] is None  # no CPU peak
        assert row["step_time_p10_s"] <= row["step_time_s"] <= row["step_time_p90_s"]
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["step_time_s"])
        assert row["tflops_per_device_megatron"] > row["tflops_per_device"] > 0  # Megatron's adds the logit GEMM
        assert set(row["phases_s"]) == {"data", "forward", "backward", "step"}
    assert (dp2["tp"], dp2["dp"], tp2["tp"], tp2["dp"]) == (1, 2, 2, 1)
    assert "DDP" in dp2["baseline"] and dp2["ratio"] > 0 and dp2["baseline_step_time_s"] > 0
    assert tp2["ratio"] is None and tp2["baseline"] is None
    tr = res["transition"]
    assert set(tr["transition_s"]) == {"save", "grow_reshard", "build_load", "first_step"}
    assert set(tr["resume_s"]) == {"save", "build_load", "first_step"} and tr["ratio"] > 0
