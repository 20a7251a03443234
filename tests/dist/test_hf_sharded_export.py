"""Sharded `export-hf` of a real ~51M-parameter checkpoint: transformers loads the shards with the unsharded export's
logits, and the export's peak memory stays near one shard, far under the model (one launch, one CPU rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, _env, torchrun

MiB = 2**20
SLACK = 48 * MiB  # allocator and interpreter noise, the checkpoint's pickled metadata, the header and index


def test_sharded_export_matches_and_peak_memory_stays_near_one_shard(data_prefix, tmp_path):
    """A llama (4 x 1024, untied, ~51M parameters, 206 MB in fp32) trained one step and exported three times:
    5GB (one model.safetensors), 16MB (model-0000i-of-0000N.safetensors + index with total_size = the bytes of every
    tensor) and 8MB bf16. transformers' AutoModelForCausalLM gives bitwise equal logits for the sharded and the
    single-file export. Each sharded export's peak RSS above its RSS just before (measured in the exporting process
    itself) stays under (largest shard + 2 x largest tensor, both counted in the checkpoint's fp32 bytes that are
    read for them) + 48 MiB, and under half the model's fp32 size; no OUT.export-tmp is left behind.
    export-megatron of the same checkpoint: megatron-core's GPTModel loads it with strict=True and its logits equal
    transformers' within 1e-4; exporting again onto the non-empty directory is one `error:` line, exit 2; imported
    back through `init_from: megatron:` (the importer writing the stage's step-0 checkpoint), every weight is
    bitwise the trained checkpoint's, with Adam step 0 and zero moments."""
    r = torchrun(1, [os.path.join(REPO, "tests", "dist", "hf_sharded_worker.py"), data_prefix, str(tmp_path)], timeout=1200)
    assert r.returncode == 0, f"worker failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    res = json.loads((tmp_path / "result.json").read_text())
    model_bytes = 4 * res["params"]
    assert 45e6 < res["params"] < 60e6, res["params"]
    one, sharded, bf16 = res["one"], res["sharded"], res["bf16"]
    assert one["summary"]["weight_files"] == ["model.safetensors"] and "model.safetensors.index.json" not in one["files"]
    n = len(sharded["summary"]["weight_files"])
    assert n >= 10 and sharded["summary"]["weight_files"] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(sharded["summary"]["weight_files"]) | {"model.safetensors.index.json"} <= set(sharded["files"])
    assert res["index"]["metadata"]["total_size"] == model_bytes  # vocab 512: no padding to drop
    assert res["logits_equal"] and res["max_abs_logit"] > 0.01
    for key, c in (("one", one), ("sharded", sharded), ("bf16", bf16)):
        s = c["summary"]
        delta = c["peak"] - c["rss_before"]
        read = 4 // (2 if s["dtype"] == "bf16" else 4)  # checkpoint fp32 bytes read per byte written
        bound = read * (s["largest_shard_bytes"] + 2 * s["largest_tensor_bytes"]) + SLACK
        print(f"\n[export-hf] {key}: {len(s['weight_files'])} file(s), largest shard {s['largest_shard_bytes'] / MiB:.1f} MiB, "
              f"largest tensor {s['largest_tensor_bytes'] / MiB:.1f} MiB: peak RSS - RSS before = {delta / MiB:.1f} MiB "
              f"(bound {bound / MiB:.1f} MiB; model {model_bytes / MiB:.1f} MiB fp32) in {s['seconds']:.1f} s")
        assert not c["leftovers"]
        if key != "one":
            assert delta < bound and delta < model_bytes / 2, (key, delta, bound)
    mc = res["megatron"]
    print(f"[export-megatron] {mc['summary']['params']:,} params, {mc['summary']['bytes_written'] / MiB:.1f} MiB in "
          f"{mc['summary']['seconds']:.1f} s: max |logits(megatron-core) - logits(transformers)| {mc['max_abs_diff']:.2e}")
    assert mc["summary"]["iteration"] == 1 and mc["tracker"] == "1\n" and mc["summary"]["file"].endswith(
        os.path.join("iter_0000001", "mp_rank_00", "model_optim_rng.pt"))
    assert mc["max_abs_diff"] < 1e-4
    lines = mc["again_stderr"].strip().splitlines()
    assert mc["again_rc"] == 2 and len(lines) == 1 and "exists and is not an empty directory" in lines[0], mc["again_stderr"]
    imp = res["megatron_import"]
    print(f"[init_from megatron] {imp['tensors']} tensors imported, unequal: {imp['unequal']}")
    assert imp["same_shapes"] and imp["tensors"] == 4 * 9 + 3 and not imp["unequal"]
    assert imp["adam_step"] == 0 and imp["moments_zero"] and imp["source"] == str(tmp_path / "mcore")


def test_bad_max_shard_size_is_one_error_line(tmp_path):
    """`export-hf --max-shard-size lots` exits 2 with one `error:` line naming the option, before anything is
    read or written."""
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_hf.py"), str(tmp_path), str(tmp_path / "out"),
                        "--max-shard-size", "lots", "--no-tokenizer"], capture_output=True, text=True, env=_env(), timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --max-shard-size: 'lots' is not a size"), r.stderr
    assert not (tmp_path / "out").exists()
