"""Fused Q/K/V (and llama's gate/up) projections (Stage.fused_qkv, megagrow/model/tp.py fused_columns) at
TP=1: one GEMM for the three (two) projections over the same separate parameters, logits and every
parameter's gradient equal to the unfused path within 1e-6 (fp32), growth exact with it on, and the
option validated and recorded in the config. TP=2 (with GQA and gather_kv): tests/dist/test_fused_qkv_tp.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megagrow.config import Layout, ModelConfig, Stage
from megagrow.errors import UserError

CASES = [("gpt2", True, None), ("gpt2", False, None), ("llama", False, None), ("llama", True, 2)]


def _cfg(flavour, tie, kv, **kw) -> ModelConfig:
    return ModelConfig(
        flavour=flavour, n_layers=2, d_model=32, n_heads=4, vocab_size=300, seq_len=16, tie_embeddings=tie, n_kv_heads=kv, **kw
    )


def _run(model, fused: bool, x, y):
    model.fused_qkv = fused
    model.zero_grad(set_to_none=True)
    logits = model.logits(x)
    loss = model(x, y)
    loss.backward()
    return logits.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("flavour,tie,kv", CASES)
def test_fused_equals_unfused_within_1e6(flavour, tie, kv):
    """Same model, fused on vs off: logits, loss and the gradient of every parameter (q/k/v and gate/up weights
    and biases included) within 1e-6; the fused path never calls the q/k/v (gate/up) layers' own forward."""
    from megagrow.model.gpt import build_model
    from megagrow.parallel.groups import init_distributed

    init_distributed(Layout())
    model = build_model(_cfg(flavour, tie, kv), 0)
    assert model.fused_qkv  # the default
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 300, (3, 16), generator=g), torch.randint(0, 300, (3, 16), generator=g)
    calls = []
    for b in model.blocks:
        for layer in [b.attn.q, b.attn.k, b.attn.v] + ([b.mlp.gate, b.mlp.up] if flavour == "llama" else []):
            layer.register_forward_pre_hook(lambda *a: calls.append(1))
    ref_logits, ref_loss, ref = _run(model, False, x, y)
    n_unfused = len(calls)
    assert n_unfused > 0
    logits, loss_v, grads = _run(model, True, x, y)
    assert len(calls) == n_unfused  # no per-layer forward in the fused path
    assert (logits - ref_logits).abs().max().item() <= 1e-6
    assert abs(loss_v - ref_loss) <= 1e-6
    names = [n for n in ref if n.endswith((".q.weight", ".k.weight", ".v.weight", ".gate.weight", ".up.weight"))]
    assert len(names) == 2 * (5 if flavour == "llama" else 3)
    for n in ref:
        assert (grads[n] - ref[n]).abs().max().item() <= 1e-6, n
        assert ref[n].abs().max().item() > 0, n


class _CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_one_gemm_for_qkv_and_gate_up(flavour):
    """GEMMs in one block's forward: attention's Q, K, V projections + output = 4 unfused, 2 fused; llama's MLP
    gate, up, down = 3 unfused, 2 fused (gpt2's fc1, fc2 stay 2). Backward: 2 GEMMs per projection GEMM."""
    from megagrow.model.gpt import build_model
    from megagrow.parallel.groups import init_distributed

    init_distributed(Layout())
    model = build_model(_cfg(flavour, False, None), 0)
    block = model.blocks[0]
    x = torch.randn(2, 16, 32, requires_grad=True)
    rope = (model.rope_cos, model.rope_sin) if flavour == "llama" else None
    counts = {}
    for fused in (False, True):
        model.fused_qkv = fused
        with _CountGemms() as fwd:
            block.attn(x, rope)
            block.mlp(x)
        out = block.attn(x, rope).sum() + block.mlp(x).sum()
        with _CountGemms() as bwd:
            out.backward()
        counts[fused] = (fwd.n, bwd.n)
    unfused = 4 + (3 if flavour == "llama" else 2)
    assert counts[False] == (unfused, 2 * unfused)
    assert counts[True] == (4, 8)


@pytest.mark.parametrize("flavour,tie,kv", [("gpt2", True, None), ("llama", False, 2)])
@pytest.mark.parametrize("op", ["width2", "heads6"])
def test_growth_stays_exact_with_fused_on(flavour, tie, kv, op):
    """Width x2 and heads 4 -> 6 on a model run fused: the grown model's loss (fused) equals the small model's
    (fused) within 1e-5, and the grown model fused equals itself unfused within 1e-6 (the parameters and their
    names are the same: growth maps address q, k, v and gate, up separately)."""
    from megagrow.growth import Heads, Width, grow, load_training, state_from_training
    from megagrow.model.gpt import build_model
    from megagrow.parallel.groups import init_distributed

    init_distributed(Layout())
    small = build_model(_cfg(flavour, tie, kv), 3)
    state = state_from_training(small, None)
    new_state = grow(state, Width(2) if op == "width2" else Heads(6), seed=11)
    big, _ = load_training(new_state)
    assert small.fused_qkv and big.fused_qkv
    small.eval(), big.eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 300, (4, 16), generator=g), torch.randint(0, 300, (4, 16), generator=g)
    with torch.no_grad():
        before, after = small(x, y).item(), big(x, y).item()
        big.fused_qkv = False
        unfused = big(x, y).item()
    assert abs(after - before) < 1e-5, (before, after)
    assert abs(after - unfused) <= 1e-6


def test_option_validated_and_recorded():
    """Stage.fused_qkv: true by default, a boolean only (one-line error otherwise), recorded in to_dict and read back."""
    assert Stage().fused_qkv is True
    s = Stage.from_dict({"fused_qkv": False})
    assert s.fused_qkv is False and s.to_dict()["fused_qkv"] is False and Stage.from_dict(s.to_dict()) == s
    with pytest.raises(UserError, match="fused_qkv"):
        Stage.from_dict({"fused_qkv": "yes"})


def test_engine_builder_applies_the_stage_option():
    """build_stage's configure_model sets the model's fused flag (and chunked loss) from the stage."""
    from megagrow.model.gpt import GPT
    from megagrow.parallel.engine import configure_model
    from megagrow.parallel.groups import init_distributed

    init_distributed(Layout())
    model = GPT(_cfg("llama", False, None))
    configure_model(model, Stage(fused_qkv=False, chunked_loss=False, compile="off"))
    assert not model.fused_qkv and all(not b.attn.fused and not b.mlp.fused for b in model.blocks)
    assert model.chunked_loss is False
    configure_model(model, Stage(compile="off"))
    assert model.fused_qkv and model.chunked_loss
