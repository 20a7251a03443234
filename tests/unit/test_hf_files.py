"""Reading transformers model directories and finding a run's tokenizer: no process group, nothing downloaded."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megagrow.config import ModelConfig
from megagrow.errors import UserError

GPT2 = (
    dict(model_type="gpt2", vocab_size=520, n_positions=32, n_embd=64, n_layer=2, n_head=4),
    ModelConfig(flavour="gpt2", n_layers=2, d_model=64, n_heads=4, vocab_size=520, seq_len=32),
)
LLAMA = (
    dict(
        model_type="llama",
        vocab_size=600,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    ModelConfig(
        flavour="llama",
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        d_ff=160,
        vocab_size=600,
        seq_len=32,
        tie_embeddings=False,
        norm_eps=1e-6,
    ),
)


class NotWeights:  # a pickled object: weights_only loading must refuse it (no code from the file runs)
    pass


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_pytorch_model_bin_imports_like_safetensors(tmp_path, kind):
    """A transformers model saved as pytorch_model.bin (one file) and as two .bin shards with
    pytorch_model.bin.index.json gives the same megagrow tensors, bitwise, as its model.safetensors; a .bin
    holding a pickled object is refused in one line (weights_only loading)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megagrow.hf import HFCheckpoint

    kw, m = {"gpt2": GPT2, "llama": LLAMA}[kind]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**kw))
    model.save_pretrained(str(tmp_path / "st"))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    one, two = tmp_path / "bin", tmp_path / "sharded"
    for d in (one, two):
        os.makedirs(d)
        (d / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(sd, one / "pytorch_model.bin")
    names = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for fn, part in halves.items():
        torch.save({n: sd[n] for n in part}, two / fn)
    (two / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {n: fn for fn, ns in halves.items() for n in ns}}))
    want = HFCheckpoint(str(tmp_path / "st")).tensors_for(m)
    for d in (one, two):
        got = HFCheckpoint(str(d)).tensors_for(m)
        assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want), d
    torch.save({"x": NotWeights()}, one / "pytorch_model.bin")
    with pytest.raises(UserError, match="cannot read .*pytorch_model.bin"):
        HFCheckpoint(str(one)).tensors_for(m)


def test_default_tokenizer_found_from_another_directory(tmp_path, monkeypatch):
    """The plan's relative data prefix is looked up against the plan file's directory that the run recorded
    (RUN/manifest.json plan_file), so an export run from another current directory finds PREFIX.model; the
    current directory still works for a run without that record."""
    from megagrow.cli.export import default_tokenizer

    proj = tmp_path / "proj"
    os.makedirs(proj / "data")
    (proj / "data" / "corpus.model").write_bytes(b"x")
    run = proj / "runs" / "p"
    os.makedirs(run / "s0" / "checkpoints")
    ckpt = str(run / "s0" / "checkpoints")
    plan = {"data": {"prefix": "data/corpus"}}
    monkeypatch.chdir(tmp_path)
    assert default_tokenizer(plan, ckpt) is None  # no record, not in the current directory
    (run / "manifest.json").write_text(json.dumps({"plan_file": str(proj / "plan.yaml")}))
    assert default_tokenizer(plan, ckpt) == str(proj / "data" / "corpus.model")
    os.unlink(run / "manifest.json")
    monkeypatch.chdir(proj)
    assert default_tokenizer(plan, ckpt) == os.path.join("data", "corpus.model")
