"""Selective activation recompute (Stage.activation_checkpointing: none / attention / mlp / full):
each mode gives bitwise the loss and gradients of none; the option is validated once in the config."""

from __future__ import annotations

import pytest
import torch

from megagrow.config import RECOMPUTE, Layout, ModelConfig, Stage
from megagrow.errors import UserError


def _run(c: ModelConfig, mode, x, y, dropout_seed=None):
    from megagrow.model.gpt import build_model

    model = build_model(c, 0)
    model.activation_checkpointing = mode
    if dropout_seed is not None:
        model.set_dropout_seed(dropout_seed)
    loss = model(x, y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("flavour,tie,kv", [("gpt2", True, None), ("llama", False, 2)])
def test_every_mode_is_bitwise_equal_to_none(flavour, tie, kv):
    from megagrow.parallel.groups import init_distributed

    init_distributed(Layout())
    c = ModelConfig(flavour=flavour, n_layers=3, d_model=32, n_heads=4, vocab_size=300, seq_len=16, tie_embeddings=tie, n_kv_heads=kv)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 300, (3, 16), generator=g), torch.randint(0, 300, (3, 16), generator=g)
    ref_loss, ref = _run(c, "none", x, y)
    for mode in ("attention", "mlp", "full", True):
        loss, grads = _run(c, mode, x, y)
        assert loss == ref_loss, mode
        assert [n for n in ref if not torch.equal(ref[n], grads[n])] == [], mode
    # attention / mlp recompute keeps the dropout outside what they recompute: bitwise equal with dropout on
    cd = c.replace(dropout=0.1)
    ref_loss, ref = _run(cd, "none", x, y, dropout_seed=5)
    for mode in ("attention", "mlp"):
        loss, grads = _run(cd, mode, x, y, dropout_seed=5)
        assert loss == ref_loss and all(torch.equal(ref[n], grads[n]) for n in ref), mode


def test_recompute_really_recomputes():
    """The mode decides which forwards run twice (counted by forward pre-hooks over a forward + backward: a
    recompute stops once it has made every saved tensor again, before the sublayer's forward returns)."""
    from megagrow.model.gpt import build_model
    from megagrow.parallel.groups import init_distributed

    init_distributed(Layout())
    c = ModelConfig(flavour="llama", n_layers=2, d_model=32, n_heads=4, vocab_size=256, seq_len=8)
    x = torch.randint(0, 256, (2, 8))
    expect = {"none": (2, 2), "attention": (4, 2), "mlp": (2, 4), "full": (4, 4)}
    for mode, (n_attn, n_mlp) in expect.items():
        model = build_model(c, 0)
        model.activation_checkpointing = mode
        calls = {"attn": 0, "mlp": 0}
        for b in model.blocks:
            b.attn.register_forward_pre_hook(lambda *a: calls.__setitem__("attn", calls["attn"] + 1))
            b.mlp.register_forward_pre_hook(lambda *a: calls.__setitem__("mlp", calls["mlp"] + 1))
        model(x, x).backward()
        assert (calls["attn"], calls["mlp"]) == (n_attn, n_mlp), (mode, calls)
        with torch.no_grad():  # no gradients: nothing to recompute
            calls.update(attn=0, mlp=0)
            model(x, x)
            assert calls == {"attn": 2, "mlp": 2}


def test_config_modes_and_old_booleans():
    assert RECOMPUTE == ("none", "attention", "mlp", "full")
    assert Stage().activation_checkpointing == "none"
    assert Stage.from_dict({"activation_checkpointing": True}).activation_checkpointing == "full"
    assert Stage.from_dict({"activation_checkpointing": False}).activation_checkpointing == "none"
    for m in RECOMPUTE:
        s = Stage.from_dict({"activation_checkpointing": m})
        assert s.activation_checkpointing == m and Stage.from_dict(s.to_dict()) == s
    with pytest.raises(UserError, match="one of none, attention, mlp, full"):
        Stage.from_dict({"activation_checkpointing": "selective"})
    with pytest.raises(UserError, match="dropout 0"):
        Stage.from_dict({"activation_checkpointing": "full", "model": {"dropout": 0.1}})
    Stage.from_dict({"activation_checkpointing": "mlp", "model": {"dropout": 0.1}})  # dropout stays outside: allowed
