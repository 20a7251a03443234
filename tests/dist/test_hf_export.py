"""Exports that transformers 4.x and 5.x read (one launch, one CPU rank; nothing downloaded)."""

from __future__ import annotations

import json
import os

from conftest import REPO, torchrun


def test_export_fields_every_transformers_reads_and_logits_equal(data_prefix, tmp_path):
    """gpt2 (tied) and llama (rope_theta 5e5 untied; grouped-query, rope_theta 1e6, tied), trained 2 steps and
    exported: config.json has rope_theta at top level (what transformers 4.x reads; without it 4.x silently
    uses 10000) equal to rope_parameters.rope_theta and the model's, torch_dtype and dtype, n_positions /
    max_position_embeddings = the model's position capacity (32); tokenizer_config.json names
    PreTrainedTokenizerFast with model_max_length 32; generation_config.json carries bos/eos 1/2. The installed
    transformers' AutoConfig reads the same rope_theta, AutoTokenizer truncates a 10k-token text to 32 tokens that
    the model takes, AutoModelForCausalLM's logits equal megagrow's within 1e-5; no `torch_dtype is deprecated` message."""
    r = torchrun(1, [os.path.join(REPO, "tests", "dist", "hf_export_worker.py"), data_prefix, str(tmp_path)], timeout=900)
    assert r.returncode == 0, f"worker failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    with open(tmp_path / "result.json") as f:
        res = json.load(f)
    messages = res.pop("transformers_messages")
    assert not [m for m in messages if "torch_dtype" in m], messages
    assert set(res) == {"gpt2-tie1", "llama-tie0", "llama_gqa-tie1"}
    for key, c in res.items():
        m, cfg, tc, gen = c["model"], c["config"], c["tokenizer_config"], c["generation_config"]
        print(f"\n[export] {key}: max |logits_hf - logits_megagrow| = {c['max_abs_diff']:.2e} (max |logit| {c['max_abs']:.2f})")
        assert c["max_abs_diff"] < 1e-5 and c["max_abs"] > 0.1, (key, c["max_abs_diff"])
        assert cfg["torch_dtype"] == cfg["dtype"] == "float32", cfg
        assert cfg["n_positions" if m["flavour"] == "gpt2" else "max_position_embeddings"] == m["seq_len"] == 32, cfg
        if m["flavour"] == "llama":
            assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == m["rope_theta"] == c["auto_rope_theta"], cfg
            assert m["rope_theta"] in (5e5, 1e6)
            assert not cfg.get("rope_scaling"), cfg  # 4.x: plain RoPE
        assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and tc["model_max_length"] == 32, tc
        assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2, gen
        assert c["truncated_len"] == 32 and c["untruncated_len"] > 10_000, c
