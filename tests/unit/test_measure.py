"""Measurement pieces in one process: the FLOP convention against FLOPs counted on the real model,
the validation split, the fixed eval window list, the ledger, `megagrow plot`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megagrow.config import Layout, ModelConfig, Stage
from megagrow.data.evalset import EvalSet
from megagrow.metrics.flops import Ledger, flops_per_token, megatron_flops_per_token, peak_tflops, table_key

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _counted_train_flops_per_token(c: ModelConfig) -> float:
    """Forward + backward FLOPs of the real GPT, counted by torch's FlopCounterMode (matmuls and
    attention, 2 per multiply-add), per token. Attention through SDPA's math kernel, whose matmuls
    the counter sees (the fused CPU kernel is not registered with it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megagrow.model.gpt import build_model
    from megagrow.parallel.groups import init_distributed

    init_distributed(Layout())
    model = build_model(c, 0)
    x = torch.randint(0, c.vocab_size, (2, c.seq_len))
    with FlopCounterMode(display=False) as fc, sdpa_kernel([SDPBackend.MATH]):
        model(x, x).backward()
    return fc.get_total_flops() / x.numel()


@pytest.mark.parametrize(
    "flavour,tie,head_dim,kv",
    [("gpt2", True, None, None), ("llama", False, None, None), ("gpt2", False, 24, None), ("llama", True, None, 2)],
)
def test_flop_formulas_match_flops_counted_on_the_model(flavour, tie, head_dim, kv):
    """Megatron-LM's formula == FLOPs torch counts in forward + backward of the real model, exactly
    (it counts every weight GEMM, the logit GEMM and the attention matmuls); megagrow's convention
    == that count - the logit GEMM (6 V d) + 6 x (the bias and norm parameters, which megagrow's
    6N counts and the GEMM count does not)."""
    c = ModelConfig(
        flavour=flavour, n_layers=2, d_model=64, n_heads=4, head_dim=head_dim, vocab_size=300, seq_len=48, tie_embeddings=tie, n_kv_heads=kv
    )
    counted = _counted_train_flops_per_token(c)
    assert megatron_flops_per_token(c) == pytest.approx(counted, rel=1e-12)
    from megagrow.model.gpt import build_model

    matrices = sum(
        p.numel() for n, p in build_model(c, 0).named_parameters() if p.dim() == 2 and not n.startswith(("tok_emb", "pos_emb", "lm_head"))
    )
    vectors = c.num_params(embeddings=False) - matrices
    assert flops_per_token(c) == pytest.approx(counted - 6 * c.padded_vocab * c.d_model + 6 * vectors, rel=1e-12)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_activation_checkpointing_gives_the_same_loss_and_grads(flavour):
    """Stage.activation_checkpointing recomputes block activations in backward: loss and every gradient
    bitwise equal to the run without it (dropout 0, which the config requires)."""
    from megagrow.model.gpt import build_model
    from megagrow.parallel.groups import init_distributed

    init_distributed(Layout())
    c = ModelConfig(flavour=flavour, n_layers=3, d_model=32, n_heads=4, vocab_size=300, seq_len=16)
    x = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    out = []
    for ckpt in (False, True):
        model = build_model(c, 0)
        model.activation_checkpointing = ckpt
        loss = model(x, x)
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert out[0][0] == out[1][0]
    assert all(torch.equal(out[0][1][n], out[1][1][n]) for n in out[0][1])
    from megagrow.errors import UserError

    with pytest.raises(UserError, match="dropout 0"):
        Stage(model=c.replace(dropout=0.1), activation_checkpointing=True).validate()


def test_megatron_formula_is_the_papers_closed_form_for_gpt2():
    """For GPT-2 shapes (f = 4h, a = h) Megatron's count is 72 s L h^2 (1 + s/6h + V/12hL) per sequence."""
    c = ModelConfig(flavour="gpt2", n_layers=24, d_model=2048, n_heads=16, vocab_size=50257, seq_len=2048)
    h, s, L, V = 2048, 2048, 24, c.padded_vocab
    assert megatron_flops_per_token(c) * s == pytest.approx(72 * s * L * h * h * (1 + s / (6 * h) + V / (12 * h * L)), rel=1e-12)


def test_peak_table_and_override(monkeypatch):
    """CUDA names map to the table's rows; CPU has no peak (MFU null); the override wins."""
    assert table_key("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert table_key("NVIDIA H100 PCIe") == "H100 PCIe"
    assert table_key("NVIDIA H200") == "H200"
    assert table_key("NVIDIA A100-SXM4-80GB") == "A100"
    assert table_key("NVIDIA GeForce RTX 4090") is None
    monkeypatch.delenv("MEGAGROW_PEAK_TFLOPS", raising=False)
    assert peak_tflops(torch.device("cpu"), "bf16") is None
    assert peak_tflops(torch.device("cpu"), "bf16", override=123.0) == 123.0
    monkeypatch.setenv("MEGAGROW_PEAK_TFLOPS", "77")
    assert peak_tflops(torch.device("cpu"), "fp32") == 77.0


def test_ledger_continues_from_its_start():
    """tokens/flops at step k = start + k x (global batch x seq_len) x FLOPs/token."""
    st = Stage(model=ModelConfig(seq_len=64), layout=Layout(dp=2, micro_batch=3, grad_accum=2))
    led = Ledger.of(st, tokens0=1000, flops0=5)
    assert led.tokens(0) == 1000 and led.flops(0) == 5
    assert led.tokens(7) == 1000 + 7 * 12 * 64
    assert led.flops(7) == 5 + 7 * 12 * 64 * flops_per_token(st.model)


# ---- validation split and the eval window list ----------------------------------------------


def _prepare(tmp_path, name, *args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "prepare_data.py"), "--out", str(tmp_path / name), "--json", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def many_docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    lines = [json.dumps({"text": f"doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(20, 200))))}) for i in range(400)]
    (d / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_valid_split_is_whole_documents_and_deterministic(tmp_path, many_docs):
    """--valid-fraction 0.05 of 400 documents: 20 whole documents held out, the others in order in the
    training split, nothing lost or duplicated; the same seed gives byte-identical files, another seed
    another split; --valid-fraction 0 writes none and removes a stale one."""
    from megagrow.data import TokenDataset

    r = _prepare(tmp_path, "a", "--input", str(many_docs), "--vocab-size", "340", "--valid-fraction", "0.05")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["valid_documents"] == 20 and info["documents"] == 380
    tr, va = TokenDataset(str(tmp_path / "a")), TokenDataset(str(tmp_path / "a.valid"))
    assert va.num_tokens == info["valid_tokens"] and tr.num_tokens == info["tokens"]
    full = _prepare(tmp_path, "full", "--input", str(many_docs), "--tokenizer", str(tmp_path / "a.model"), "--valid-fraction", "0")
    assert full.returncode == 0, full.stderr
    al = TokenDataset(str(tmp_path / "full"))
    docs = [tuple(al.document(i)) for i in range(al.num_documents)]
    got_tr = [tuple(tr.document(i)) for i in range(tr.num_documents)]
    got_va = [tuple(va.document(i)) for i in range(va.num_documents)]
    assert sorted(got_tr + got_va) == sorted(docs)
    assert got_tr == [d for d in docs if d not in set(got_va)]  # training keeps the original order
    assert not os.path.exists(str(tmp_path / "full.valid.idx"))

    again = _prepare(tmp_path, "b", "--input", str(many_docs), "--tokenizer", str(tmp_path / "a.model"), "--valid-fraction", "0.05")
    assert again.returncode == 0
    for ext in (".bin", ".idx", ".valid.bin", ".valid.idx"):
        assert open(tmp_path / f"a{ext}", "rb").read() == open(tmp_path / f"b{ext}", "rb").read(), ext
    _prepare(tmp_path, "c", "--input", str(many_docs), "--tokenizer", str(tmp_path / "a.model"), "--valid-fraction", "0.05", "--seed", "5")
    assert open(tmp_path / "c.valid.bin", "rb").read() != open(tmp_path / "a.valid.bin", "rb").read()
    stale = _prepare(tmp_path, "c", "--input", str(many_docs), "--tokenizer", str(tmp_path / "a.model"), "--valid-fraction", "0")
    assert stale.returncode == 0 and not os.path.exists(tmp_path / "c.valid.idx")
    assert sorted(p for p in os.listdir(tmp_path) if "tmp" in p) == []


def test_valid_split_too_few_documents_is_one_line_error(tmp_path):
    """One input file (one document) cannot be split: exit 2, one 'error:' line, nothing written."""
    import textwrap

    r = _prepare(tmp_path, "x", "--input", textwrap.__file__, "--vocab-size", "340")
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.splitlines()) == 1
    assert "--valid-fraction 0" in r.stderr and os.listdir(tmp_path) == []


@pytest.mark.parametrize("n_valid_tokens,seq_len,eval_tokens", [(5000, 32, 1000), (5000, 32, 10**6), (700, 16, 300)])
def test_eval_windows_cover_the_list_once_whatever_the_layout(tmp_path, n_valid_tokens, seq_len, eval_tokens):
    """For dp in 1..4 and micro batch in 1..5: the counted reads of all ranks cover the window list
    exactly once, every rank runs the same number of rounds; the list itself depends only on
    (split, seq_len, eval_tokens) and is capped at the windows available."""
    from megagrow.data import DatasetWriter

    prefix = str(tmp_path / "d")
    rng = np.random.default_rng(1)
    for p, n in ((prefix, 100), (prefix + ".valid", n_valid_tokens)):
        with DatasetWriter(p, 512, 2) as w:
            w.add_document(rng.integers(3, 512, size=n - 1))
    es, why = EvalSet.open(prefix, seq_len, eval_tokens, 512)
    assert es is not None, why
    avail = (n_valid_tokens - 1) // seq_len
    assert es.num_windows == min(-(-eval_tokens // seq_len), avail)
    assert len(set(es.window_ids.tolist())) == es.num_windows and es.window_ids.max() < avail
    for dp in range(1, 5):
        for mb in range(1, 6):
            reads = [es.rounds(r, dp, mb) for r in range(dp)]
            assert len({len(x) for x in reads}) == 1
            counted = np.concatenate([ids for rr in reads for ids, c in rr if c])
            assert sorted(counted.tolist()) == sorted(es.window_ids.tolist())


def test_eval_set_absent_without_split_or_with_zero_tokens(tmp_path):
    from megagrow.data import DatasetWriter

    prefix = str(tmp_path / "d")
    with DatasetWriter(prefix, 512, 2) as w:
        w.add_document(np.arange(3, 400))
    es, why = EvalSet.open(prefix, 16, 1000, 512)
    assert es is None and "no validation split" in why
    with DatasetWriter(prefix + ".valid", 512, 2) as w:
        w.add_document(np.arange(3, 400))
    es, why = EvalSet.open(prefix, 16, 0, 512)
    assert es is None and "eval_tokens is 0" in why


# ---- plot -----------------------------------------------------------------------------------


def test_plot_writes_a_png_of_two_runs(tmp_path):
    """Two run directories (a staged one with two stages, a baseline) -> one PNG; a directory
    without logs is a one-line error and leaves no file."""

    def write(run, stage, recs):
        os.makedirs(tmp_path / run / stage, exist_ok=True)
        with open(tmp_path / run / stage / "log.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)

    write(
        "staged",
        "small",
        [{"stage": "small", "step": s, "loss": 5 - s / 10, "tokens": 100 * s, "flops": 1e9 * s} for s in range(1, 11)]
        + [{"stage": "small", "step": 10, "eval_loss": 4.1, "tokens": 1000, "flops": 1e10, "at": "stage_end"}],
    )
    write(
        "staged",
        "wide",
        [{"stage": "wide", "step": 0, "eval_loss": 4.1, "tokens": 1000, "flops": 1e10, "at": "after_growth"}]
        + [{"stage": "wide", "step": s, "loss": 4 - s / 10, "tokens": 1000 + 100 * s, "flops": 1e10 + 4e9 * s} for s in range(1, 11)],
    )
    write("base", "s0", [{"stage": "s0", "step": s, "loss": 5 - s / 12, "tokens": 100 * s, "flops": 4e9 * s} for s in range(1, 21)])
    out = tmp_path / "fig.png"
    r = subprocess.run(
        [sys.executable, "-m", "megagrow.cli", "plot", str(tmp_path / "staged"), str(tmp_path / "base"), "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(out) > 10_000
    info = json.loads(r.stdout)
    assert info["runs"][0]["stages"] == ["small", "wide"] and info["runs"][0]["eval_points"] == 2
    bad = subprocess.run(
        [sys.executable, "-m", "megagrow.cli", "plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and not os.path.exists(tmp_path / "x.png")


def test_growth_report_line_and_warning():
    """The transition line reads 'eval loss at growth A -> B: x -> y (delta d)'; a loss-preserving operator
    moving the fp32 eval loss by more than 1e-4 adds a WARNING naming the grown tensor kinds; `stack`
    (not loss preserving) does not warn."""
    from megagrow.config import load_plan
    from megagrow.train.loop import growth_report

    plan = load_plan(os.path.join(REPO, "recipes", "tiny.yaml"))
    assert growth_report(plan, 1, 4.8512, 4.8512) == "[megagrow] eval loss at growth small -> wide: 4.8512 -> 4.8512 (delta 0.0e+00)"
    assert "WARNING" not in growth_report(plan, 1, 4.8512, 4.85125)
    warned = growth_report(plan, 2, 4.8512, 4.9)
    assert "WARNING: depth is loss preserving" in warned and "attn.q.weight" in warned
    stacked = plan.replace(stages=(plan.stages[0], plan.stages[1], plan.stages[2].replace(grow="stack")))
    assert "WARNING" not in growth_report(stacked, 2, 4.8512, 4.9)


# ---------------------------------------------------------------------------------------
# `megagrow bench --options`: each MFU option on/off beside the stage as it is

OPTIONS_PLAN = """
name: opts
seed: 3
data: {{prefix: /nonexistent}}
stages:
  - name: s
    model: {{flavour: llama, n_layers: 2, d_model: 32, n_heads: 4, n_kv_heads: 2, vocab_size: 300, seq_len: 16, dropout: {dropout}}}
    layout: {{tp: 1, dp: {dp}, zero_stage: {zero}, micro_batch: 2}}
    steps: 10
"""


def _options_plan(tmp_path, dp=1, zero=1, dropout=0.0):
    from megagrow.config import load_plan

    p = tmp_path / f"opts_{dp}_{zero}_{dropout}.yaml"
    p.write_text(OPTIONS_PLAN.format(dp=dp, zero=zero, dropout=dropout))
    return str(p), load_plan(str(p))


def test_option_rows_change_one_option_each(tmp_path):
    """--options' rows: the base, then fused_qkv, chunked_loss, compile flipped, each other recompute mode, and
    at DP=2 ZeRO-2 the overlap flipped; each row's stage differs from the base in exactly its one option.
    Rows the stage would refuse are left out: full recompute with dropout, compile on at ZeRO-3, overlap at
    DP=1 or ZeRO-3."""
    from megagrow.bench.run import option_rows, row_plan

    _, plan = _options_plan(tmp_path, dp=2, zero=2)
    rows = option_rows(plan, 0)
    assert [r["option"] for r in rows] == [
        "base",
        "fused_qkv=false",
        "chunked_loss=false",
        "compile=on",
        "recompute=attention",
        "recompute=mlp",
        "recompute=full",
        "overlap=true",
    ]
    base = plan.stages[0].to_dict()
    for r in rows:
        over = {k: v for k, v in r.items() if k != "option"}
        st = row_plan(plan, 0, {k: v for k, v in over.items() if k != "overlap"}, 2).stages[0].to_dict()
        changed = {k for k in base if base[k] != st[k]}
        assert changed == {k for k in over if k != "overlap"}, (r, changed)  # overlap: the engine's config, not the stage
    _, plan = _options_plan(tmp_path, dp=1, zero=3, dropout=0.1)
    labels = [r["option"] for r in option_rows(plan, 0)]
    assert labels == ["base", "fused_qkv=false", "chunked_loss=false", "recompute=attention", "recompute=mlp"]


def test_options_and_sweep_together_is_a_one_line_error(tmp_path, capsys):
    """--options with --sweep: exit 2, one `error:` line, nothing run."""
    from megagrow.bench.run import main

    path, _ = _options_plan(tmp_path)
    assert main([path, "--synthetic", "--options", "--sweep", "micro_batch=1,2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --options and --sweep")


@pytest.mark.slow
def test_bench_options_rows_in_one_run(tmp_path, capsys):
    """`megagrow bench --options` in one process (up to a minute: the compile=on row runs inductor on CPU): 7
    rows in one JSON, each row's recorded options those of its label; every row's first-step loss (same
    initial weights, same first batch) equals the base row's within 1e-5, so no option changes what is
    trained; the base row's time ratio is 1; the table has the option column and `x base`."""
    from megagrow.bench.run import format_table, main

    path, _ = _options_plan(tmp_path)
    out = tmp_path / "opts.json"
    assert main([path, "--synthetic", "--options", "--steps", "1", "--warmup", "0", "--no-baseline", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [r["option"] for r in rows] == [
        "base",
        "fused_qkv=false",
        "chunked_loss=false",
        "compile=on",
        "recompute=attention",
        "recompute=mlp",
        "recompute=full",
    ]
    flags = {r["option"]: (r["fused_qkv"], r["chunked_loss"], r["compiled"], r["activation_checkpointing"], r["overlap"]) for r in rows}
    assert flags == {
        "base": (True, True, False, "none", False),
        "fused_qkv=false": (False, True, False, "none", False),
        "chunked_loss=false": (True, False, False, "none", False),
        "compile=on": (True, True, True, "none", False),
        "recompute=attention": (True, True, False, "attention", False),
        "recompute=mlp": (True, True, False, "mlp", False),
        "recompute=full": (True, True, False, "full", False),
    }
    for r in rows:
        assert not r["oom"] and abs(r["loss_first"] - rows[0]["loss_first"]) <= 1e-5, r
        assert r["time_vs_base"] == pytest.approx(r["step_time_s"] / rows[0]["step_time_s"])
        assert r["cpu_time_vs_base"] == pytest.approx(r["step_cpu_time_s"] / rows[0]["step_cpu_time_s"])
    assert rows[0]["time_vs_base"] == rows[0]["cpu_time_vs_base"] == 1.0 and rows[0]["loss_first"] > 5.0
    table = format_table(res)
    assert "cpu x base" in table and "recompute=mlp" in table and "compiled" in table
