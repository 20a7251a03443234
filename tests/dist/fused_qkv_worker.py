"""Worker for tests/dist/test_fused_qkv_tp.py (2 ranks): fused vs unfused Q/K/V and gate/up at TP=2, and
through DeepSpeed's ZeRO-3 engine at DP=2; with `compile`: the TP=2 engine with compiled blocks vs eager.
Writes OUT/result.json (every rank's result) from rank 0."""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megagrow.config import Layout, ModelConfig, Plan  # noqa: E402

CASES = {  # name: model; at tp=2: gpt2 MHA, llama GQA with tp | n_kv_heads, llama MQA (tp > n_kv_heads: gather_kv)
    "gpt2": dict(flavour="gpt2", tie_embeddings=True),
    "llama-gqa2": dict(flavour="llama", n_kv_heads=2, tie_embeddings=False),
    "llama-kv1-gather": dict(flavour="llama", n_kv_heads=1, tie_embeddings=True),
}


def _count_all_reduces():
    calls = [0]
    real = torch.distributed.all_reduce

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    torch.distributed.all_reduce = counting
    return calls, lambda: setattr(torch.distributed, "all_reduce", real)


def tp_case(kw: dict) -> dict:
    from megagrow.model.gpt import build_model

    c = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=300, seq_len=16, **kw)
    model = build_model(c, 5)
    g = torch.Generator().manual_seed(0)  # the same batch on both ranks
    x, y = torch.randint(0, 300, (3, 16), generator=g), torch.randint(0, 300, (3, 16), generator=g)
    out = {}
    for fused in (False, True):
        model.fused_qkv = fused
        model.zero_grad(set_to_none=True)
        logits = model.logits(x).detach()
        loss = model(x, y)
        loss.backward()
        out[fused] = (logits, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    # input-gradient all-reduces in one attention's backward (its output projection reduces in forward)
    attn = model.blocks[0].attn
    rope = (model.rope_cos, model.rope_sin) if c.flavour == "llama" else None
    reduces = {}
    for fused in (False, True):
        model.fused_qkv = fused
        h = torch.randn(2, 16, 32, generator=g, requires_grad=True)
        o = attn(h, rope).sum()
        calls, restore = _count_all_reduces()
        o.backward()
        restore()
        reduces[str(fused)] = calls[0]
    (l0, s0, g0), (l1, s1, g1) = out[False], out[True]
    qkv = [n for n in g0 if n.endswith((".q.weight", ".k.weight", ".v.weight", ".q.bias", ".gate.weight", ".up.weight"))]
    return {"gather_kv": attn.gather_kv, "logits_diff": (l1 - l0).abs().max().item(), "loss_diff": abs(s1 - s0),
            "grad_diff": max((g1[n] - g0[n]).abs().max().item() for n in g0),
            "qkv_grad_min_abs_max": min(g0[n].abs().max().item() for n in qkv), "n_qkv": len(qkv),
            "all_reduces_backward": reduces}


def zero3_losses(fused: bool) -> list[float]:
    """3 steps of the engine (build_stage, train_step) at DP=2 ZeRO-3, synthetic tokens."""
    from megagrow.bench.loops import MegagrowLoop, PhaseTimer

    plan = Plan.from_dict({"name": "fz3", "seed": 3, "data": {"prefix": "/nonexistent"}, "stages": [{
        "name": "s", "steps": 10, "fused_qkv": fused, "compile": "off",
        "model": {"flavour": "llama", "n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 300, "seq_len": 16},
        "layout": {"tp": 1, "dp": 2, "zero_stage": 3, "micro_batch": 2}}]})
    lp = MegagrowLoop(plan, 0, True, PhaseTimer(lambda: None, False))
    assert lp.engine.module.fused_qkv is fused
    out = [lp.step().item() for _ in range(3)]
    lp.close()
    return out


def tp2_compile_losses(compile_mode: str) -> dict:
    """3 steps of the engine at TP=2 ZeRO-1 (llama, 1 K/V head: gather_kv), blocks compiled or not."""
    from torch._dynamo.utils import counters

    from megagrow.bench.loops import MegagrowLoop, PhaseTimer

    plan = Plan.from_dict({"name": "ctp", "seed": 3, "data": {"prefix": "/nonexistent"}, "stages": [{
        "name": "s", "steps": 10, "compile": compile_mode,
        "model": {"flavour": "llama", "n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 1, "vocab_size": 300, "seq_len": 16},
        "layout": {"tp": 2, "dp": 1, "zero_stage": 1, "micro_batch": 2}}]})
    counters.clear()
    lp = MegagrowLoop(plan, 0, True, PhaseTimer(lambda: None, False))
    out = [lp.step().item() for _ in range(3)]
    lp.close()
    return {"losses": out, "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def main():
    from megagrow.parallel.groups import init_distributed

    out_dir = sys.argv[1]
    if sys.argv[2:] == ["compile"]:
        init_distributed(Layout(tp=2, dp=1, zero_stage=1))
        res = {"eager": tp2_compile_losses("off"), "compiled": tp2_compile_losses("on")}
    else:
        init_distributed(Layout(tp=2, dp=1, zero_stage=1))
        res = {name: tp_case(kw) for name, kw in CASES.items()}
        init_distributed(Layout(tp=1, dp=2, zero_stage=3))
        res["zero3"] = {"unfused": zero3_losses(False), "fused": zero3_losses(True)}
    # every rank's result: rank 1's differences count as much as rank 0's
    from megagrow import collectives

    every = collectives.all_gather_object(res)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(every, f)
    # every rank leaves together, as the other workers do: no rank's exit meets a peer still in gloo
    collectives.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
