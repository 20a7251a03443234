"""Megatron-LM checkpoint export (megagrow/interop/megatron.py) verified against megatron-core itself: its GPTModel
built with the local layer spec on CPU (one gloo process) loads the converted state dict with strict=True and gives
megagrow's logits. megatron-core's forward path asks for a CUDA device in three places that have no CPU branch
(RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device(); DotProductAttention's score buffer comes
from GlobalMemoryBuffer.get_tensor(device=torch.cuda.current_device()); the default causal mask is made with
device="cuda"): tests/megatron_ref.py passes the causal mask explicitly, uses megatron-core's own inference RNG
tracker (no CUDA RNG states), and points torch.cuda.current_device at the CPU for the duration of the forward."""

from __future__ import annotations

import json
import os

import pytest
import torch
from megatron_ref import megatron_gpt, megatron_logits

from megagrow.config import Layout, ModelConfig
from megagrow.errors import UserError

CASES = {
    "llama-gqa-untied": dict(
        flavour="llama",
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=300,
        seq_len=32,
        tie_embeddings=False,
        rope_theta=5e5,
        norm_eps=1e-6,
    ),
    "llama-mqa-tied": dict(
        flavour="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=1, vocab_size=300, seq_len=32, head_dim=24, d_ff=160
    ),
    "gpt2-tied": dict(flavour="gpt2", n_layers=2, d_model=64, n_heads=4, vocab_size=300, seq_len=32, max_positions=48),
    "gpt2-untied": dict(flavour="gpt2", n_layers=1, d_model=48, n_heads=3, vocab_size=200, seq_len=16, tie_embeddings=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_megatron_core_loads_strictly_and_gives_megagrow_logits(tmp_path, case):
    """write_megatron of a randomly initialised megagrow model: the legacy layout on disk (tracker file naming the
    iteration, iter_0000123/mp_rank_00/model_optim_rng.pt with model / iteration / checkpoint_version 3.0, no args);
    megatron-core's GPTModel loads the file's state dict with strict=True (every key and shape, the _extra_state
    entries included) and its logits equal megagrow's within 1e-4 over 32 positions; read back (read_megatron +
    from_megatron) every logical tensor is bitwise the original."""
    from megagrow.interop.megatron import TRACKER, checkpoint_file, from_megatron, read_megatron, write_megatron
    from megagrow.model.gpt import build_model
    from megagrow.parallel.groups import init_distributed

    m = ModelConfig(**CASES[case])
    init_distributed(Layout())
    model = build_model(m, seed=11).eval()
    with torch.no_grad():  # layer norms away from 1 and 0, so a swapped norm or bias would show
        for n, p in model.named_parameters():
            if ".ln" in n or n.startswith("ln_f") or n.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    P = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = tmp_path / "mcore"
    s = write_megatron(str(out), m, P.__getitem__, 123, {"test": case})
    assert (out / TRACKER).read_text() == "123\n" and s["file"] == checkpoint_file(str(out), 123)
    payload = torch.load(s["file"], weights_only=True)
    assert set(payload) == {"model", "iteration", "checkpoint_version"} and payload["checkpoint_version"] == 3.0
    assert payload["iteration"] == 123
    meta = json.loads((out / "megagrow.json").read_text())
    assert meta["megatron_args"]["num-query-groups" if m.n_kv_heads else "num-attention-heads"] == m.kv_heads

    mc = megatron_gpt(m)
    assert set(mc.state_dict()) == set(payload["model"])
    mc.load_state_dict(payload["model"], strict=True)
    L = min(m.seq_len, 32)
    x = torch.randint(0, m.vocab_size, (2, L), generator=torch.Generator().manual_seed(5))
    theirs = megatron_logits(mc, x)[..., : m.vocab_size]
    with torch.no_grad():
        mine = model.logits(x)[..., : m.vocab_size]
    diff = (theirs - mine).abs().max().item()
    print(f"\n[megatron] {case}: max |logits(megatron-core) - logits(megagrow)| {diff:.2e} (max |logit| {mine.abs().max().item():.2f})")
    assert diff < 1e-4 and mine.abs().max().item() > 0.05

    it, sd = read_megatron(str(out))
    back = from_megatron(m, sd.__getitem__)
    assert it == 123 and back.keys() == P.keys() and all(torch.equal(back[k], P[k]) for k in P)


def test_qkv_layout_is_megatrons_per_group_interleave():
    """The fused QKV rows are, per query group g, [the group's query heads | K head g | V head g] (what megatron-core's
    get_query_key_value_tensors splits): checked on labelled rows for 6 heads in 2 groups of head_dim 2."""
    from megagrow.interop.megatron import _qkv, _split_qkv

    m = ModelConfig(flavour="llama", n_layers=1, d_model=12, n_heads=6, n_kv_heads=2, head_dim=2, vocab_size=128)
    q = torch.arange(12.0)[:, None]  # q head j: rows 2j, 2j+1
    k, v = 100 + torch.arange(4.0)[:, None], 200 + torch.arange(4.0)[:, None]
    rows = _qkv(m, q, k, v)[:, 0].tolist()
    assert rows == [0, 1, 2, 3, 4, 5, 100, 101, 200, 201, 6, 7, 8, 9, 10, 11, 102, 103, 202, 203]
    assert all(torch.equal(a, b) for a, b in zip(_split_qkv(m, _qkv(m, q, k, v)), (q, k, v)))


def test_refusals_are_one_line(tmp_path):
    """RoPE scaling, a non-empty output, a negative iteration, a directory that is not a Megatron checkpoint: one
    line each, nothing written."""
    from megagrow.interop.megatron import read_megatron, write_megatron

    m = ModelConfig(flavour="llama", n_layers=1, d_model=16, n_heads=2, vocab_size=128, rope_scaling={"rope_type": "linear", "factor": 2.0})
    for args, msg in (
        ((str(tmp_path / "a"), m, None, 1, {}), "rope_scaling 'linear' is not exported"),
        ((str(tmp_path / "b"), m.replace(rope_scaling=None), None, -1, {}), "--iteration must be an integer >= 0"),
        ((str(tmp_path), m.replace(rope_scaling=None), None, 1, {}), "exists and is not an empty directory"),
    ):
        (tmp_path / "x").write_text("keep")
        with pytest.raises(UserError) as e:
            write_megatron(*args)
        assert msg in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["x"]
    with pytest.raises(UserError, match="no latest_checkpointed_iteration.txt"):
        read_megatron(str(tmp_path))


def test_megatron_checkpoint_as_init_from(tmp_path):
    """`init_from: megatron:PATH` reads an exported checkpoint back for the same model bitwise (MegatronCheckpoint,
    the importer's source); a plan accepts hf: and megatron: and nothing else; a stage whose model differs from the
    one megagrow.json records, a directory without the tracker, a checkpoint of another size without megagrow.json:
    one line each (the first two from the torch-free check the controller runs before launching)."""
    from megagrow.config import Plan
    from megagrow.hf import check_init_from
    from megagrow.interop.megatron import MegatronCheckpoint, write_megatron
    from megagrow.model.gpt import build_model
    from megagrow.parallel.groups import init_distributed

    m = ModelConfig(**CASES["llama-gqa-untied"])
    init_distributed(Layout())
    P = {n: p.detach().clone() for n, p in build_model(m, seed=3).named_parameters()}
    out = tmp_path / "mcore"
    write_megatron(str(out), m, P.__getitem__, 7, {})
    got = MegatronCheckpoint(str(out)).tensors_for(m, "s")
    assert got.keys() == P.keys() and all(torch.equal(got[k], P[k]) for k in P)

    def stage(model, spec=f"megatron:{out}"):
        return Plan.from_dict({"stages": [{"name": "s", "init_from": spec, "model": model}]}).stages[0]

    check_init_from(stage(m.to_dict()))
    with pytest.raises(UserError) as e:
        check_init_from(stage(dict(m.to_dict(), d_ff=128)))
    assert str(e.value) == f"{out} does not match the model of stage 's': ffn_dim 192 (stage: 128)"
    with pytest.raises(UserError, match=r"no latest_checkpointed_iteration.txt \(not a Megatron-LM checkpoint directory\)$"):
        check_init_from(stage(m.to_dict(), f"megatron:{tmp_path}"))
    with pytest.raises(UserError, match=r"init_from must be hf:PATH .* or megatron:PATH .*, got 'nemo:/x'$"):
        stage(m.to_dict(), "nemo:/x")
    os.unlink(out / "megagrow.json")  # a checkpoint Megatron-LM wrote: checked by its tensors
    with pytest.raises(UserError) as e:
        MegatronCheckpoint(str(out)).tensors_for(m.replace(d_ff=128), "s")
    assert "has shape (192, 64), stage 's' needs (128, 64)" in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_checkpoint_is_one_error_line(tmp_path):
    """`megagrow export-megatron` (tools/export_megatron.py) on a directory that is not a checkpoint: one `error:`
    line, exit 2, nothing written."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run(
        [sys.executable, os.path.join(repo, "tools", "export_megatron.py"), str(tmp_path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "no DeepSpeed checkpoint" in lines[0], r.stderr
    assert os.listdir(tmp_path) == []
