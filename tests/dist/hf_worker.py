"""Hugging Face interop scenarios, launched with torchrun (gloo, CPU), like tests/dist/worker.py.

    torchrun --nproc_per_node=2 tests/dist/hf_worker.py SCENARIO DATA_PREFIX OUT_DIR

Rank 0 writes OUT_DIR/result.json; tests/dist/test_hf.py makes the assertions. transformers
never downloads anything here: every model is built from a config in the scenario.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megagrow.config import Layout, ModelConfig  # noqa: E402
from megagrow.parallel.groups import init_distributed  # noqa: E402
from worker import RANK, WORLD, read_log, tiny_plan  # noqa: E402

def tokens(vocab: int, T: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(vocab))


def megagrow_logits(ckpt_dir: str, x: torch.Tensor, tag: str | None = None) -> torch.Tensor:
    """Logits (vocabulary without padding) of the checkpoint's weights in megagrow's own model at the
    current TP size (process groups set), gathered over the TP ranks."""
    from megatron.core import parallel_state

    from megagrow.model.gpt import GPT
    from megagrow.model.tp import tp_slice
    from megagrow.state.checkpoint import SourceCheckpoint

    src = SourceCheckpoint.open(ckpt_dir, tag)
    tp, r = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    model = GPT(src.model)
    shapes = src.logical_shapes()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tp_slice(src.read_box(name, "w", tuple((0, n) for n in shapes[name])), p, tp, r))
        model.eval()
        lg = model.logits(x)
        if tp > 1:
            parts = [torch.empty_like(lg) for _ in range(tp)]
            torch.distributed.all_gather(parts, lg.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            lg = torch.cat(parts, -1)
    return lg[..., :src.model.vocab_size]


def hf_logits(path: str, x: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(x).logits


def _stage(plan, **layout):
    ds = "ds_configs/cpu.json" if layout.get("zero_stage") == 3 else None
    s = plan.stages[0]
    return s.replace(layout=s.layout.replace(**layout, ds_config=ds))


def export(prefix: str, out: str) -> dict:
    """Train 3 steps at TP=2 x DP=1 ZeRO-2 or ZeRO-3, export (rank 0) through megagrow.cli.export, load the
    result in transformers: logits equal megagrow's (TP=2 model, same weights) on the same tokens."""
    from megagrow.cli.export import export as export_hf
    from megagrow.train import train_stage

    cases = [("gpt2", True, 2, "fp32"), ("gpt2", False, 3, "fp32"), ("llama", False, 2, "fp32"), ("llama", True, 3, "fp32"),
             ("llama_gqa", False, 2, "fp32"), ("llama_gqa", True, 3, "fp32"), ("llama_mqa", False, 3, "fp32"),
             ("llama_gqa", False, 2, "bf16")]  # bf16 training: the fp32 master weights are exported
    res = {}
    for flavour, tie, zero, dtype in cases:
        plan = tiny_plan(prefix, flavour, steps=3, tie=tie, tp=2, dp=WORLD // 2, zero_stage=zero, dtype=dtype,
                         ds_config="ds_configs/cpu.json" if zero == 3 else None)
        # vocab 520 (padded to 640 here, trimmed on export); llama at transformers' default eps 1e-6 (megagrow's is 1e-5)
        eps = 1e-6 if flavour != "gpt2" else 1e-5
        plan = plan.replace(stages=(plan.stages[0].replace(model=plan.stages[0].model.replace(vocab_size=520, norm_eps=eps)),))
        key = f"{flavour}-tie{int(tie)}-z{zero}" + ("-bf16" if dtype == "bf16" else "")
        run = os.path.join(out, key)
        init_distributed(plan.stages[0].layout)
        train_stage(plan, 0, run, quiet=True)
        torch.distributed.barrier()
        ckpt = os.path.join(run, "s0", "checkpoints")
        m = plan.stages[0].model
        x = tokens(m.vocab_size)
        mine = megagrow_logits(ckpt, x)
        if RANK == 0:
            info = export_hf(os.path.join(run, "s0"), os.path.join(out, key + "-hf"))
            theirs = hf_logits(info["out"], x)
            res[key] = {"max_abs_diff": (mine - theirs).abs().max().item(), "max_abs": mine.abs().max().item(),
                        "shape": list(theirs.shape), "architecture": info["architecture"], "params": info["params"],
                        "num_params": m.num_params() - (m.padded_vocab - m.vocab_size) * m.d_model * (1 if m.tie_embeddings else 2),
                        "layout": info["source_layout"], "tokenizer_vocab": info["tokenizer"]["vocab_size"]}
        torch.distributed.barrier()
    return res


def _randomize(model, seed: int) -> None:
    """Every weight random (norm gains around 1, biases around 0): logits far from trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if name.endswith("weight") else 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_((0.1 if p.dim() > 1 else 0.05) * torch.randn(p.shape, generator=g))


HF_MODELS = {
    # name: (transformers config kwargs, the matching megagrow model)
    "gpt2": (dict(model_type="gpt2", vocab_size=520, n_positions=32, n_embd=64, n_layer=2, n_head=4),
             dict(flavour="gpt2", n_layers=2, d_model=64, n_heads=4, vocab_size=520, seq_len=32, tie_embeddings=True)),
    "llama_gqa": (dict(model_type="llama", vocab_size=600, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False),
                  dict(flavour="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=160, vocab_size=600, seq_len=32,
                       tie_embeddings=False, norm_eps=1e-6)),
    "llama": (dict(model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                   num_attention_heads=2, max_position_embeddings=32, tie_word_embeddings=True, rms_norm_eps=1e-5),
              dict(flavour="llama", n_layers=1, d_model=64, n_heads=2, d_ff=128, vocab_size=384, seq_len=32,
                   tie_embeddings=True, norm_eps=1e-5)),
}


def build_hf(out: str) -> dict:
    """Random transformers models saved with save_pretrained (rank 0), no download."""
    from transformers import AutoConfig, AutoModelForCausalLM

    init_distributed(Layout(tp=1, dp=WORLD))
    paths = {}
    for i, (name, (kw, _)) in enumerate(HF_MODELS.items()):
        path = os.path.join(out, f"hf-{name}")
        if RANK == 0:
            kw = dict(kw)
            cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
            model = AutoModelForCausalLM.from_config(cfg)
            _randomize(model, 100 + i)
            # GPT-2 saved in shards (model.safetensors.index.json): the import reads sharded weights too
            model.save_pretrained(path, max_shard_size="200KB" if name == "gpt2" else "5GB")
        paths[name] = path
    torch.distributed.barrier()
    return paths


def import_grow(prefix: str, out: str) -> dict:
    """(1) init_from a random transformers GPT-2 / Llama (GQA) / Llama at TP=1 x DP=2 and TP=2 x DP=1: megagrow's
    logits equal transformers' on the same tokens; (2) import -> width x2 -> depth x2 (shard to shard, layouts
    changing) -> export: the grown model's logits in transformers equal the small transformers model's."""
    from megagrow.growth.ops import Depth, Width  # noqa: F401 - operators named by the stages' grow fields
    from megagrow.cli.export import export as export_hf
    from megagrow.hf import import_checkpoint
    from megagrow.state.checkpoint import SourceCheckpoint
    from megagrow.state.executor import regrow
    from megagrow.train import train_stage

    paths = build_hf(out)
    res = {"gpt2_files": sorted(os.listdir(paths["gpt2"]))}
    for name, (_, mkw) in HF_MODELS.items():
        base = tiny_plan(prefix, steps=3)
        m = ModelConfig(**mkw)
        x = tokens(m.vocab_size)
        ref = hf_logits(paths[name], x) if RANK == 0 else None
        for tp, zero in ((1, 3), (2, 2)):
            s0 = _stage(base, tp=tp, dp=WORLD // tp, zero_stage=zero).replace(model=m, init_from=f"hf:{paths[name]}")
            plan = base.replace(stages=(s0,))
            init_distributed(s0.layout)
            if name != "llama" and tp == 2:  # through the trainer's start-up (init_from hook), 0 steps
                train_stage(plan, 0, os.path.join(out, f"{name}-run"), stop_at=0, quiet=True)
                ck = os.path.join(out, f"{name}-run", "s0", "checkpoints")
            else:
                ck = os.path.join(out, f"{name}-tp{tp}")
                import_checkpoint(plan, 0, ck)
            mine = megagrow_logits(ck, x)
            if RANK == 0:
                res[f"import-{name}-tp{tp}-z{zero}"] = {"max_abs_diff": (mine - ref).abs().max().item(),
                                                        "max_abs": ref.abs().max().item()}
        if name == "llama":
            continue
        # grow chain: imported at TP=2 ZeRO-2 (above) -> width x2 at TP=1 x DP=2 ZeRO-3 -> depth x2 at TP=2 ZeRO-1
        wide = m.replace(d_model=2 * m.d_model, n_heads=2 * m.n_heads, d_ff=2 * m.ffn_dim,
                         n_kv_heads=None if m.n_kv_heads is None else 2 * m.n_kv_heads)
        deep = wide.replace(n_layers=2 * m.n_layers)
        s0 = _stage(base, tp=2, dp=WORLD // 2, zero_stage=2).replace(model=m, init_from=f"hf:{paths[name]}")
        s1 = _stage(base, tp=1, dp=WORLD, zero_stage=3).replace(name="s1", model=wide, grow="width")
        s2 = _stage(base, tp=2, dp=WORLD // 2, zero_stage=1).replace(name="s2", model=deep, grow="depth")
        plan = base.replace(stages=(s0, s1, s2))
        prev = os.path.join(out, f"{name}-run", "s0", "checkpoints")
        for k in (1, 2):
            init_distributed(plan.stages[k].layout)
            nxt = os.path.join(out, f"{name}-grown{k}")
            regrow(plan, k, SourceCheckpoint.open(prev), nxt)
            torch.distributed.barrier()
            prev = nxt
        if RANK == 0:
            info = export_hf(prev, os.path.join(out, f"{name}-grown-hf"), no_tokenizer=True)
            grown = hf_logits(info["out"], x)
            from transformers import AutoConfig, AutoModelForCausalLM

            c = AutoConfig.from_pretrained(info["out"])
            res[f"grow-{name}"] = {"max_abs_diff": (grown - ref).abs().max().item(), "max_abs": ref.abs().max().item(),
                                   "params_small": AutoModelForCausalLM.from_pretrained(paths[name]).num_parameters(),
                                   "params_grown": info["params"],
                                   "grown_config": {k: getattr(c, k, None) for k in ("n_embd", "n_layer", "hidden_size",
                                                                                     "num_hidden_layers", "num_key_value_heads")}}
        torch.distributed.barrier()
    return res


def megatron(prefix: str, out: str) -> dict:
    """The conftest corpus rewritten in Megatron's indexed format by megatron-core's own builder (one sequence
    per document, end-of-document token appended as preprocess_data.py --append-eod does): training on it gives
    the same losses as on megagrow's own format (the same token stream), and 3 steps + resume in a fresh
    engine to 6 equals 6 uninterrupted steps, bitwise, at TP=1 x DP=2 ZeRO-2 and TP=2 ZeRO-3 (dropout on)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megagrow.data import TokenDataset
    from megagrow.train import train_stage

    init_distributed(Layout(tp=1, dp=WORLD))
    mt = os.path.join(out, "megatron_corpus")
    if RANK == 0:
        ds = TokenDataset(prefix)
        b = IndexedDatasetBuilder(mt + ".bin", dtype=DType.optimal_dtype(ds.vocab_size))
        for d in range(ds.num_documents):
            ids = np.concatenate([ds.document(d), [ds.eos_id]]).astype(np.int64)
            b.add_document(torch.from_numpy(ids), [len(ids)])
        b.finalize(mt + ".idx")
    torch.distributed.barrier()
    res = {}
    for tp, zero in ((1, 2), (2, 3)):
        key = f"tp{tp}-dp{WORLD // tp}-z{zero}"
        runs = {}
        for name, data, stop in (("megagrow", prefix, None), ("megatron", mt, None), ("megatron_resumed", mt, 3)):
            if tp == 2 and name == "megagrow":
                continue
            plan = tiny_plan(data, steps=6, tp=tp, dp=WORLD // tp, zero_stage=zero, dropout=0.1,
                             ds_config="ds_configs/cpu.json" if zero == 3 else None)
            run = os.path.join(out, f"{key}-{name}")
            train_stage(plan, 0, run, stop_at=stop, quiet=True)
            torch.distributed.barrier()
            if stop:
                train_stage(plan, 0, run, quiet=True)
                torch.distributed.barrier()
            if RANK == 0:
                runs[name] = [r["loss"] for r in read_log(run)]
        res[key] = runs
    return res


if __name__ == "__main__":
    scenario, prefix, out = sys.argv[1:4]
    result = {"export": export, "import_grow": import_grow, "megatron": megatron}[scenario](prefix, out)
    if RANK == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
