"""Sharded safetensors export (megagrow/interop/hf_export.py) and GPT-2 position tables kept at their imported
size (ModelConfig.max_positions). Every transformers model is built from a local config: nothing is downloaded."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megagrow.config import Layout, ModelConfig, Plan
from megagrow.errors import UserError


def _random_hf(path, kind: str):
    """A random transformers model saved at `path`: gpt2 (n_positions 256, tied) or llama (GQA, untied)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=256, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=300,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
            )
        )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.eval().save_pretrained(str(path))
    return model


def _imported(src, **model):
    from megagrow.hf import HFCheckpoint, read_hf_dir

    _, fields, _ = read_hf_dir(str(src))
    m = ModelConfig(**{k: v for k, v in fields.items() if not k.startswith("_")}, **model)
    return m, HFCheckpoint(str(src)).tensors_for(m, "s")


def _export(out, m, P, max_bytes, dtype=torch.float32):
    from megagrow.hf import hf_config, set_dtype, write_config
    from megagrow.interop.hf_export import write_safetensors

    os.makedirs(out)
    cfg = hf_config(m)
    set_dtype(cfg, str(dtype).replace("torch.", ""))
    write_config(cfg, m, str(out))
    shapes = {n: tuple(t.shape) for n, t in P.items()}
    closed = []
    info = write_safetensors(str(out), m, shapes, lambda n: P[n].clone(), dtype, max_bytes, after_shard=lambda: closed.append(1))
    assert len(closed) == len(info["files"])
    return info


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sharded_export_loads_in_transformers_with_the_same_logits(tmp_path, kind):
    """An imported model exported with a 40 kB shard limit: model-0000i-of-0000N.safetensors files (none over the
    limit unless it holds one larger tensor), an index whose weight_map names every tensor once and whose total_size
    is the tensors' bytes; every tensor bitwise equal to the single-file export's; transformers'
    AutoModelForCausalLM loads the shards and gives bitwise the single-file export's logits (and the source model's
    within 1e-5); megagrow's importer reads the sharded directory back bitwise; a limit above the model size writes
    one model.safetensors and no index."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    theirs = _random_hf(src, kind)
    m, P = _imported(src, seq_len=64, **({"max_positions": 256} if kind == "gpt2" else {}))
    one = _export(tmp_path / "one", m, P, 10**9)
    assert one["files"] == ["model.safetensors"] and not (tmp_path / "one" / "model.safetensors.index.json").exists()
    limit = 40_000
    info = _export(tmp_path / "sharded", m, P, limit)
    n = len(info["files"])
    assert n >= 5 and info["files"] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    with safe_open(str(tmp_path / "one" / "model.safetensors"), "pt") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()}
    assert (
        sorted(index["weight_map"]) == sorted(ref)
        and index["metadata"]["total_size"] == sum(t.numel() * 4 for t in ref.values()) == info["total_size"]
    )
    for fn in info["files"]:
        with safe_open(str(tmp_path / "sharded" / fn), "pt") as f:
            names = list(f.keys())
            assert names and all(index["weight_map"][k] == fn for k in names)
            sizes = [f.get_tensor(k).numel() * 4 for k in names]
            assert sum(sizes) <= limit or len(names) == 1, (fn, sizes)
            for k in names:
                assert torch.equal(f.get_tensor(k), ref[k]), k
    x = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "one"), dtype=torch.float32).eval()(x).logits
        b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded"), dtype=torch.float32).eval()(x).logits
        src_logits = theirs(x).logits
    print(
        f"\n[sharded] {kind}: {n} shards, max |logits(sharded) - logits(one file)| {(a - b).abs().max().item():.1e}, "
        f"vs the source model {(b - src_logits).abs().max().item():.1e}"
    )
    assert torch.equal(a, b) and (b - src_logits).abs().max().item() < 1e-5
    _, back = _imported(tmp_path / "sharded", seq_len=64, **({"max_positions": 256} if kind == "gpt2" else {}))
    assert back.keys() == P.keys() and all(torch.equal(back[k], P[k]) for k in P)


def test_bf16_shards_and_size_parsing(tmp_path):
    """--dtype bf16 shards hold the bf16 cast of every tensor bitwise (the shard plan counts 2 bytes a value);
    sizes parse as transformers reads them (GB = 1e9, GiB = 2^30) and anything else is one error line."""
    from safetensors import safe_open

    from megagrow.hf import to_hf
    from megagrow.interop.hf_export import parse_size

    m, P = _imported(_random_hf_dir(tmp_path), seq_len=64)
    info = _export(tmp_path / "bf16", m, P, 20_000, torch.bfloat16)
    ref = dict(to_hf(m, P.__getitem__))
    assert info["total_size"] == sum(t.numel() * 2 for t in ref.values())
    for fn in info["files"]:
        with safe_open(str(tmp_path / "bf16" / fn), "pt") as f:
            for k in f.keys():
                assert f.get_tensor(k).dtype == torch.bfloat16 and torch.equal(f.get_tensor(k), ref[k].to(torch.bfloat16))
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500 MB") == 5 * 10**8
    assert parse_size("1.5kb") == 1500 and parse_size(4096) == 4096 and parse_size("123") == 123
    for bad in ("5 GBs", "-1GB", "0", "lots", ""):
        with pytest.raises(UserError) as e:
            parse_size(bad)
        assert "\n" not in str(e.value) and str(e.value).startswith("--max-shard-size"), str(e.value)


def _random_hf_dir(tmp_path):
    src = tmp_path / "llama"
    _random_hf(src, "llama")
    return src


def test_gpt2_keeps_its_imported_position_table(tmp_path):
    """A GPT-2 with n_positions 256 imported into a stage with seq_len 128 and max_positions 256 keeps all 256
    learned positions (bitwise); megagrow's model gives transformers' logits within 1e-5 at 128 and 200 positions;
    exported, config.json has n_positions 256 and wpe is bitwise the source's. Without max_positions the table is
    cut to seq_len (as before); max_positions above the source's table or below seq_len is a one-line error."""
    from safetensors import safe_open

    from megagrow.hf import check_init_from
    from megagrow.model.gpt import GPT
    from megagrow.parallel.groups import init_distributed

    src = tmp_path / "gpt2"
    theirs = _random_hf(src, "gpt2")
    m, P = _imported(src, seq_len=128, max_positions=256)
    wpe = theirs.transformer.wpe.weight.detach()
    assert m.n_positions == 256 and torch.equal(P["pos_emb.weight"], wpe)
    init_distributed(Layout())
    model = GPT(m)
    assert tuple(model.pos_emb.weight.shape) == (256, 64)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(P[n])
        for T in (128, 200):
            x = torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(T))
            d = (model.eval().logits(x)[..., :300] - theirs(x).logits).abs().max().item()
            print(f"\n[positions] gpt2 at {T} positions: max |logit diff| {d:.2e}")
            assert d < 1e-5
    _export(tmp_path / "out", m, P, 10**9)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_positions"] == 256
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("transformer.wpe.weight"), wpe)

    m2, P2 = _imported(src, seq_len=128)
    assert m2.max_positions is None and m2.n_positions == 128 and torch.equal(P2["pos_emb.weight"], wpe[:128])
    st = {"name": "s", "init_from": f"hf:{src}", "model": dict(m.to_dict(), max_positions=512)}
    with pytest.raises(UserError, match=r"has 256 positions, fewer than the max_positions 512 of stage 's'$"):
        check_init_from(Plan.from_dict({"stages": [st]}).stages[0])
    with pytest.raises(UserError) as e:
        ModelConfig.from_dict({"seq_len": 128, "max_positions": 64}, "model")
    assert str(e.value) == "model: max_positions must be an integer >= seq_len 128 (or null: seq_len), got 64"
    assert "max_positions" not in ModelConfig().to_dict()  # configs recorded before the field compare equal
    assert ModelConfig.from_dict(m.to_dict()) == m and m.to_dict()["max_positions"] == 256


def test_growth_keeps_the_position_table():
    """Every growth operator keeps max_positions; width x2 and depth x2 of a GPT-2 with a 96-row table at seq_len 48
    keep 96 rows (width: (96, d) -> (96, 2d)) and the logits (fp32, within 1e-5) at 48 and 80 positions."""
    from megagrow.growth import FFN, Depth, Heads, Width, grow, load_training, state_from_training
    from megagrow.model.gpt import build_model
    from megagrow.parallel.groups import init_distributed

    init_distributed(Layout())
    m = ModelConfig(flavour="gpt2", n_layers=2, d_model=64, n_heads=4, vocab_size=300, seq_len=48, max_positions=96)
    for op in (Width(2), Depth(2), FFN(d_ff=512), Heads(6)):
        assert op.new_config(m).max_positions == 96
    state = state_from_training(build_model(m, seed=5), None)
    for T in (48, 80):
        x = torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            before = load_training(state)[0].eval().logits(x)[..., :300]
            for op in (Width(2), Depth(2)):
                grown = grow(state, op, seed=3)
                model = load_training(grown)[0].eval()
                assert model.pos_emb.weight.shape[0] == 96 and grown.config.n_positions == 96
                d = (model.logits(x)[..., :300] - before).abs().max().item()
                print(f"\n[positions] gpt2 {op.name} at {T} positions: max |logit diff| {d:.2e}")
                assert d < 1e-5
