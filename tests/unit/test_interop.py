"""Interop pieces that need no process group: tokenizers for transformers, tokenizer.json for
prepare_data.py, Megatron indexed datasets read through megatron-core, config mappings.
transformers never downloads anything here (conftest sets HF_HUB_OFFLINE=1; everything is built locally)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
from conftest import REPO, _env

from megagrow.config import ModelConfig, Plan
from megagrow.errors import UserError

STDLIB = sysconfig.get_paths()["stdlib"]
CORPUS = [os.path.join(STDLIB, f) for f in ("argparse.py", "dataclasses.py", "json/decoder.py", "textwrap.py")]
ODD = ["  héllo  wörld\n\n\tx = 1  ", "日本語のテキスト 😀 \x00\x07", " leading space", "trailing\n\n\n", "", "a" * 3000]


def _texts():
    return [open(f).read() for f in CORPUS] + [open(os.path.join(STDLIB, f)).read() for f in ("os.py", "shutil.py", "heapq.py")] + ODD


def test_sentencepiece_model_exported_as_tokenizer_json_encodes_identically(data_prefix, tmp_path):
    """The sentencepiece model, written for transformers (tokenizer.json, converted by its own normalizer
    settings), loads with AutoTokenizer and gives the same ids as sentencepiece on every test text (stdlib
    sources, odd whitespace, non-ASCII and byte-fallback characters), and decodes back to the text."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from megagrow.hf import write_tokenizer

    info = write_tokenizer(data_prefix + ".model", str(tmp_path), 512)
    assert info["vocab_size"] == 512 and info["eos_token_id"] == 2 and info["bos_token_id"] == 1
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= set(os.listdir(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    sp = spm.SentencePieceProcessor(model_file=data_prefix + ".model")
    n_tokens = 0
    for t in _texts():
        ids = sp.encode(t)
        assert hf.encode(t, add_special_tokens=False) == ids, repr(t[:60])
        assert hf.decode(ids) == t, repr(t[:60])
        n_tokens += len(ids)
    assert n_tokens > 100_000
    with pytest.raises(UserError, match="more than the model's vocab_size 500"):
        write_tokenizer(data_prefix + ".model", str(tmp_path / "x"), 500)


def _prepare(out, *extra):
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "prepare_data.py"),
        "--out",
        str(out),
        "--json",
        "--no-progress",
        "--valid-fraction",
        "0",
    ]
    for f in CORPUS:
        cmd += ["--input", f]
    return subprocess.run(cmd + list(extra), capture_output=True, text=True, env=_env(), timeout=300)


def test_prepare_data_takes_a_tokenizer_json_or_model(data_prefix, tmp_path):
    """prepare_data.py --tokenizer tokenizer.json (the sentencepiece model converted) writes a dataset bitwise equal
    to the sentencepiece one and adopts the tokenizer as PREFIX.tokenizer.json; --tokenizer X.model adopts it as
    PREFIX.model and removes the json; a tokenizer.json without an end-of-document token is one error line, exit 2,
    nothing written."""
    from megagrow.hf import load_tokenizer_object

    tok, _ = load_tokenizer_object(data_prefix + ".model")
    tok.save(str(tmp_path / "tok.json"))
    r = _prepare(tmp_path / "a", "--tokenizer", str(tmp_path / "tok.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokenizer"] == str(tmp_path / "a.tokenizer.json")
    for ext in (".bin", ".idx"):
        assert open(str(tmp_path / "a") + ext, "rb").read() == open(data_prefix + ext, "rb").read(), ext
    r = _prepare(tmp_path / "a", "--tokenizer", data_prefix + ".model")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(tmp_path / "a.model") and not os.path.exists(tmp_path / "a.tokenizer.json")
    bad = json.loads(open(tmp_path / "tok.json").read())
    for t in bad.get("added_tokens", []):
        t["content"] = t["content"].replace("</s>", "<end>")
    bad["model"]["vocab"] = {k.replace("</s>", "<end>"): v for k, v in bad["model"]["vocab"].items()}
    (tmp_path / "noeos.json").write_text(json.dumps(bad))
    r = _prepare(tmp_path / "b", "--tokenizer", str(tmp_path / "noeos.json"))
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "no end-of-document token" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not any(p.name.startswith("b.") for p in tmp_path.iterdir())


def _megatron_copy(data_prefix: str, out: str, eod: bool = True) -> str:
    """The conftest corpus rewritten in Megatron's format by megatron-core's own builder, one sequence per
    document, with the end-of-document token appended (preprocess_data.py --append-eod)."""
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megagrow.data import TokenDataset

    ds = TokenDataset(data_prefix)
    b = IndexedDatasetBuilder(out + ".bin", dtype=DType.optimal_dtype(ds.vocab_size))
    for d in range(ds.num_documents):
        ids = np.concatenate([ds.document(d), [ds.eos_id] if eod else []]).astype(np.int64)
        b.add_document(torch.from_numpy(ids), [len(ids)])
    b.finalize(out + ".idx")
    return out


def test_megatron_indexed_dataset_gives_the_same_windows(data_prefix, tmp_path):
    """A Megatron-format copy of the corpus (megatron-core's IndexedDatasetBuilder, --append-eod layout) read
    through megatron-core's IndexedDataset gives every training window bitwise equal to megagrow's own format;
    token ids outside the model's vocabulary and a truncated .bin are one-line UserErrors."""
    from megagrow.data import TokenDataset
    from megagrow.data.megatron import MegatronTokens, is_megatron, open_dataset

    prefix = _megatron_copy(data_prefix, str(tmp_path / "mt"))
    ours = TokenDataset(data_prefix)
    mt = open_dataset(prefix, vocab_limit=512)
    assert isinstance(mt, MegatronTokens) and is_megatron(prefix) and not is_megatron(data_prefix)
    assert isinstance(open_dataset(data_prefix), TokenDataset)
    assert mt.num_tokens == ours.num_tokens and mt.num_documents == ours.num_documents and mt.dtype == np.uint16
    for L in (16, 127):
        n = ours.num_windows(L)
        assert mt.num_windows(L) == n
        assert np.array_equal(mt.windows(np.arange(n), L), ours.windows(np.arange(n), L))
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        open_dataset(prefix, vocab_limit=100)
    cut = str(tmp_path / "cut")
    for ext in (".bin", ".idx"):
        data = open(prefix + ext, "rb").read()
        open(cut + ext, "wb").write(data[:-10] if ext == ".bin" else data)
    with pytest.raises(UserError, match="do not lie back to back"):
        open_dataset(cut)


def test_hf_config_mapping_round_trip():
    """megagrow ModelConfig -> transformers config -> megagrow fields: sizes, GQA, head_dim, tying and the
    norm eps (written as set: transformers' Llama default is 1e-6, megagrow's 1e-5) survive; other
    architectures and RoPE types other than default, llama3, linear, dynamic, yarn are UserErrors; a heads-grown GPT-2 is not exportable."""
    from megagrow.hf import hf_config, model_fields_from_hf

    for m in (
        ModelConfig(flavour="gpt2", n_layers=2, d_model=64, n_heads=4, vocab_size=500, seq_len=32),
        ModelConfig(
            flavour="llama", n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=700, tie_embeddings=False, rope_theta=5e5, d_ff=96
        ),
        ModelConfig(flavour="llama", n_layers=1, d_model=64, n_heads=2, head_dim=48, norm_eps=1e-6),
    ):
        got = model_fields_from_hf(hf_config(m).to_dict(), "x")
        for k in ("flavour", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "tie_embeddings", "norm_eps"):
            assert got[k] == getattr(m, k), (k, got[k], getattr(m, k))
        assert got["d_ff"] == m.ffn_dim
        if m.flavour == "llama":
            assert got["rope_theta"] == m.rope_theta
    from transformers import LlamaConfig

    assert model_fields_from_hf(LlamaConfig(hidden_size=64, num_attention_heads=4).to_dict(), "x")["norm_eps"] == 1e-6
    with pytest.raises(UserError, match="architecture 'BertForMaskedLM' is not supported"):
        model_fields_from_hf({"architectures": ["BertForMaskedLM"], "model_type": "bert"}, "x")
    with pytest.raises(UserError, match=r"rope type 'longrope' is not supported \(supported: default, llama3, linear, dynamic, yarn\)"):
        model_fields_from_hf(
            dict(
                LlamaConfig(hidden_size=64, num_attention_heads=4).to_dict(),
                rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0},
            ),
            "x",
        )
    with pytest.raises(UserError, match="GPT2LMHeadModel needs n_heads x head_dim == d_model"):
        hf_config(ModelConfig(flavour="gpt2", d_model=32, n_heads=6, head_dim=8))


def test_init_from_is_validated_once():
    """init_from: hf:PATH on the first stage only, spelled hf:PATH."""
    st = {"model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "vocab_size": 512}}
    ok = Plan.from_dict({"stages": [dict(st, name="a", init_from="hf:/x"), dict(st, name="b")]})
    assert ok.stages[0].init_from == "hf:/x" and ok.stages[1].init_from is None
    with pytest.raises(UserError, match="only the first stage may have init_from"):
        Plan.from_dict({"stages": [dict(st, name="a"), dict(st, name="b", init_from="hf:/x")]})
    with pytest.raises(UserError, match="init_from must be hf:PATH"):
        Plan.from_dict({"stages": [dict(st, name="a", init_from="/x")]})


INIT_PLAN = """name: imp
data: {{prefix: {prefix}}}
stages:
  - name: s
    init_from: "hf:{hf}"
    model: {{n_layers: 1, d_model: 32, n_heads: 2, vocab_size: 512, seq_len: 16}}
    layout: {{tp: 1, dp: 1, micro_batch: 2}}
    steps: 2
"""


def test_init_from_bad_input_is_one_error_line_and_nothing_written(data_prefix, tmp_path, capfd):
    """`megagrow train` of a stage with init_from: a transformers directory of another architecture, a missing
    weights file, a missing directory, a vocab larger than the model's, other sizes: each one 'error:' line,
    exit 2, no traceback, no checkpoint (not even a partial one) written."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def save(name, kind, **kw):
        path = tmp_path / name
        AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **kw)).save_pretrained(str(path))
        return path

    gpt2 = dict(n_positions=16, n_embd=32, n_layer=1, n_head=2)
    neox = save(
        "neox",
        "gpt_neox",
        vocab_size=512,
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=1,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    nofile = save("nofile", "gpt2", vocab_size=512, **gpt2)
    os.unlink(nofile / "model.safetensors")
    big = save("big", "gpt2", vocab_size=600, **gpt2)
    wide = save("wide", "gpt2", vocab_size=512, **dict(gpt2, n_embd=64))
    cases = [
        (neox, "architecture 'GPTNeoXForCausalLM' is not supported"),
        (nofile, "no model.safetensors"),
        (tmp_path / "absent", "transformers model directory not found"),
        (big, "has a vocab of 600, larger than the vocab_size 512 of stage 's'"),
        (wide, "does not match the model of stage 's': d_model 64 (stage: 32)"),
    ]
    from megagrow.cli import main

    for i, (hf, needle) in enumerate(cases):
        d = tmp_path / f"case{i}"
        d.mkdir()
        plan = d / "plan.yaml"
        plan.write_text(INIT_PLAN.format(prefix=data_prefix, hf=hf))
        args = ["train", str(plan), "--run-dir", str(d / "run")]
        if i == 0:  # the real command line once (exit code, no traceback); the rest in this process (faster)
            env = {
                k: v
                for k, v in _env().items()  # not this process's rendezvous (an in-process test may have set one)
                if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
            }
            r = subprocess.run(
                [sys.executable, "-m", "megagrow.cli", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
            )
            rc, err = r.returncode, r.stderr
        else:
            capfd.readouterr()
            rc = main(args)
            err = capfd.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert rc == 2 and "Traceback" not in err and len(lines) == 1 and needle in lines[0], (needle, err[-2000:])
        assert not os.path.exists(d / "run" / "s" / "checkpoints") and not os.path.exists(d / "run" / "s" / "checkpoints.partial")
    # the controller checks init_from before it launches anything (reading config.json only, no torch)
    plan = tmp_path / "case4" / "plan.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "megagrow.cli", "run", str(plan), "--run-dir", str(tmp_path / "ctl"), "--local", "--dry-run"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "stage 0 (s): init_from:" in r.stderr and "d_model 64 (stage: 32)" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "ctl" / "s")
