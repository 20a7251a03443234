"""Hugging Face transformers interop on CPU/gloo: export from sharded checkpoints, import at TP=1
and TP=2, import -> grow -> export. transformers never downloads anything: every model is
built from a config in the test (conftest sets HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, _env, torchrun

TOL = 1e-5  # fp32 logits


def run_hf_worker(scenario: str, data: str, out) -> dict:
    r = torchrun(2, [os.path.join(REPO, "tests", "dist", "hf_worker.py"), scenario, data, str(out)])
    assert r.returncode == 0, f"hf_worker {scenario} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    with open(os.path.join(out, "result.json")) as f:
        return json.load(f)


def _export_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_hf.py"), *map(str, args)],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)


def test_export_from_tp2_zero2_and_zero3_equals_megagrow_in_transformers(data_prefix, tmp_path):
    """Checkpoints trained 3 steps at TP=2 ZeRO-2 and TP=2 ZeRO-3 (gpt2 and llama, tied and untied, llama with
    2 K/V heads and with 1; one trained in bf16, whose fp32 master weights are exported), exported: GPT2LMHeadModel / LlamaForCausalLM loaded by transformers give logits
    equal to megagrow's own TP=2 model within 1e-5 (fp32) on the same tokens; the vocabulary padding (520 ->
    640 rows) is trimmed and the parameter count is the model's. Then the CLI: --json summary, the tokenizer
    loads with AutoTokenizer and encodes like sentencepiece, --dtype bf16 writes bf16 weights; bad input (missing checkpoint, non-empty output,
    a tokenizer larger than the model's vocab) is one error line, exit 2, nothing written."""
    res = run_hf_worker("export", data_prefix, tmp_path)
    assert set(res) == {"gpt2-tie1-z2", "gpt2-tie0-z3", "llama-tie0-z2", "llama-tie1-z3", "llama_gqa-tie0-z2",
                        "llama_gqa-tie1-z3", "llama_mqa-tie0-z3", "llama_gqa-tie0-z2-bf16"}
    for key, r in res.items():
        print(f"\n[export] {key}: max |logits_hf - logits_megagrow| = {r['max_abs_diff']:.2e} (max |logit| {r['max_abs']:.2f})")
        assert r["max_abs_diff"] < TOL, (key, r)
        assert r["max_abs"] > 0.1, (key, r)  # not trivially zero
        assert r["shape"][-1] == 520 and r["params"] == r["num_params"] and r["tokenizer_vocab"] == 512, (key, r)
        assert r["layout"]["tp"] == 2 and r["layout"]["zero_stage"] == int(key.split("-z")[1][0]), key

    import sentencepiece as spm
    from transformers import AutoTokenizer

    ckpt = tmp_path / "llama_gqa-tie0-z2" / "s0" / "checkpoints"
    out = tmp_path / "cli-out"
    r = _export_cli(ckpt, out, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["architecture"] == "LlamaForCausalLM" and s["tag"] == "step_00000003" and s["tokenizer"]["vocab_size"] == 512
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model"} <= set(os.listdir(out))
    text = open(os.path.join(os.path.dirname(os.__file__), "textwrap.py")).read()
    sp = spm.SentencePieceProcessor(model_file=data_prefix + ".model")
    assert AutoTokenizer.from_pretrained(str(out)).encode(text, add_special_tokens=False) == sp.encode(text)
    r = _export_cli(ckpt, tmp_path / "cli-bf16", "--dtype", "bf16", "--no-tokenizer", "--json")
    assert r.returncode == 0, r.stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cli-bf16" / "model.safetensors"), framework="pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    assert not os.path.exists(tmp_path / "cli-bf16" / "tokenizer.json")
    r = subprocess.run([sys.executable, "-m", "megagrow.cli", "export-hf", "--help"], capture_output=True, text=True,
                       env=_env(), cwd=REPO, timeout=120)
    assert r.returncode == 0 and "safetensors" in r.stdout

    from megagrow.hf import load_tokenizer_object

    big, _ = load_tokenizer_object(data_prefix + ".model")
    big.add_tokens([f"<extra_{i}>" for i in range(20)])  # 532 tokens > the model's 520
    big.save(str(tmp_path / "big.json"))

    def bad(args, needle, target):
        r = _export_cli(*args)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1 and needle in r.stderr, r.stderr
        assert not os.path.exists(f"{target}.export-tmp")

    bad([tmp_path / "nope", tmp_path / "o1"], "checkpoint not found", tmp_path / "o1")
    assert not os.path.exists(tmp_path / "o1")
    bad([ckpt, out], "refusing to overwrite", out)
    bad([ckpt, tmp_path / "o2", "--tokenizer", tmp_path / "big.json"], "532 tokens, more than the model's vocab_size 520",
        tmp_path / "o2")
    assert not os.path.exists(tmp_path / "o2")


def test_import_at_tp1_and_tp2_then_grow_and_export(data_prefix, tmp_path):
    """Random transformers GPT-2 (tied, vocab 520, saved in safetensors shards), Llama with grouped-query attention
    (untied, vocab 600) and Llama (tied), built and saved in the test: imported (init_from) at TP=1 x DP=2 ZeRO-3 and TP=2 ZeRO-2, megagrow's logits
    equal transformers' within 1e-5. Then import -> width x2 (TP=1 x DP=2, ZeRO-3) -> depth x2 (TP=2, ZeRO-1),
    shard to shard -> export: the grown model's logits in transformers equal the small model's within 1e-5."""
    res = run_hf_worker("import_grow", data_prefix, tmp_path)
    files = res.pop("gpt2_files")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1, files
    assert {k for k in res if k.startswith("import-")} == {f"import-{n}-{lay}" for n in ("gpt2", "llama_gqa", "llama")
                                                           for lay in ("tp1-z3", "tp2-z2")}
    assert {k for k in res if k.startswith("grow-")} == {"grow-gpt2", "grow-llama_gqa"}
    for key, r in res.items():
        print(f"\n[hf] {key}: max |logits diff| = {r['max_abs_diff']:.2e} (max |logit| {r['max_abs']:.2f})")
        assert r["max_abs_diff"] < TOL and r["max_abs"] > 0.5, (key, r)
    for key in ("grow-gpt2", "grow-llama_gqa"):
        r = res[key]
        assert r["params_grown"] > 4 * r["params_small"], r  # really the bigger model (width x2, depth x2)
    assert res["grow-llama_gqa"]["grown_config"]["num_key_value_heads"] == 4  # group size kept: 8 heads / 4


def test_megatron_indexed_dataset_trains_like_megagrow_format_and_resumes_bitwise(data_prefix, tmp_path):
    """A corpus in Megatron's indexed format, written by megatron-core's own IndexedDatasetBuilder (one sequence per
    document, end-of-document token appended like preprocess_data.py --append-eod), read through megatron-core's
    IndexedDataset under the global-sample-index sampler: the losses equal those on megagrow's own format of the
    same tokens, bitwise; 3 steps + resume in a fresh engine to 6 equals 6 uninterrupted steps, bitwise (dropout
    on), at TP=1 x DP=2 ZeRO-2 and TP=2 ZeRO-3."""
    res = run_hf_worker("megatron", data_prefix, tmp_path)
    assert set(res) == {"tp1-dp2-z2", "tp2-dp1-z3"}
    for key, r in res.items():
        assert len(r["megatron"]) == 6 and r["megatron_resumed"] == r["megatron"], (key, r)
        assert r["megatron"][-1] < r["megatron"][0], (key, r)  # it trains
    assert res["tp1-dp2-z2"]["megagrow"] == res["tp1-dp2-z2"]["megatron"]
