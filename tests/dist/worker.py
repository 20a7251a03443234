"""Multi-process scenarios, launched by the tests with torchrun (gloo, CPU).

    torchrun --nproc_per_node=W tests/dist/worker.py SCENARIO DATA_PREFIX OUT_DIR

Each scenario runs several configurations inside one launch (start-up costs seconds) and
rank 0 writes OUT_DIR/result.json; the pytest side makes the assertions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megagrow.config import Layout, ModelConfig, OptimConfig, Plan, Stage, DataConfig  # noqa: E402
from megagrow.parallel.groups import init_distributed  # noqa: E402

WORLD = int(os.environ["WORLD_SIZE"])
RANK = int(os.environ["RANK"])


def tiny_plan(prefix: str, flavour="gpt2", steps=6, tie=True, dropout=0.0, **layout) -> Plan:
    kv = {"llama_gqa": 2, "llama_mqa": 1}.get(flavour)  # grouped-query attention: 2 groups / 1 K/V head
    model = ModelConfig(flavour="llama" if kv else flavour, n_layers=2, d_model=64, n_heads=4, vocab_size=512, seq_len=32,
                        tie_embeddings=tie, dropout=dropout, n_kv_heads=kv)
    lay = Layout(**{"tp": 1, "dp": WORLD, "zero_stage": 2, "micro_batch": 2, "grad_accum": 2, **layout})
    optim = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2, weight_decay=0.1, grad_clip=1.0)
    st = Stage(name="s0", model=model, layout=lay, optim=optim, steps=steps, save_every=1000, log_every=1, eval_tokens=1024)
    return Plan(name="t", seed=7, data=DataConfig(prefix=prefix), stages=(st,))


def read_log(run_dir: str) -> list[dict]:
    """The training records of stage s0 (eval records, which carry eval_loss instead of loss, left out)."""
    with open(os.path.join(run_dir, "s0", "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def logical_grads(model, tp: int) -> dict:
    """Gather TP shards of every .grad into the logical tensor."""
    from megatron.core import parallel_state

    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(g) for _ in range(tp)]
            torch.distributed.all_gather(parts, g, group=parallel_state.get_tensor_model_parallel_group())
            g = torch.cat(parts, dim=p.partition_dim)
        out[name] = g
    return out


def logical_params(model, tp: int) -> dict:
    """Every parameter as its logical tensor: ZeRO-3 partitions gathered over DP, TP shards over TP."""
    import contextlib

    import deepspeed
    from megatron.core import parallel_state

    out = {}
    for name, p in model.named_parameters():
        whole = deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_tensor") else contextlib.nullcontext()
        with whole:
            t = p.detach().clone()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(t) for _ in range(tp)]
            torch.distributed.all_gather(parts, t, group=parallel_state.get_tensor_model_parallel_group())
            t = torch.cat(parts, dim=p.partition_dim)
        out[name] = t
    return out


def _mismatched(a: dict, b: dict) -> list:
    return sorted(set(a) ^ set(b)) + sorted(n for n in a if n in b and not torch.equal(a[n], b[n]))


def _zero3_weights(plan: Plan, tp: int) -> dict:
    """Initial logical weights of `plan`'s stage 0 built by the trainer's build_stage at ZeRO-3, TP=tp."""
    from megagrow.parallel.engine import build_stage

    lay = plan.stages[0].layout.replace(tp=tp, dp=WORLD // tp, zero_stage=3, ds_config="ds_configs/cpu.json")
    plan = plan.replace(stages=(plan.stages[0].replace(layout=lay),))
    init_distributed(lay)
    engine, _ = build_stage(plan, 0)
    w = logical_params(engine.module, tp)
    engine.destroy()
    return w


def tp_equiv(prefix: str, out: str) -> dict:
    """Loss and logical grads at TP=1 vs TP=2, same seed, same batch, both flavours; initial
    weights at TP=1, TP=2 and ZeRO-3 (DP=2, partitioned as built by deepspeed.zero.Init); the
    split of every TP=2 parameter (megatron's attributes) vs megagrow.params' table."""
    from megagrow.model.gpt import build_model
    from megagrow.data.batches import Batches
    from megagrow.params import partition_dim

    res = {}
    for flavour, tie in (("gpt2", True), ("llama", False), ("llama", True), ("llama_gqa", False), ("llama_mqa", True)):
        plan = tiny_plan(prefix, flavour, tie=tie)
        st = plan.stages[0]
        per_tp = {}
        for tp in (1, 2):
            init_distributed(Layout(tp=tp, dp=WORLD // tp))
            model = build_model(st.model, plan.seed)
            init = logical_params(model, tp)
            splits = {n: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
                      for n, p in model.named_parameters()}
            b = Batches.open(plan, st.replace(layout=st.layout.replace(dp=1, micro_batch=4, grad_accum=1)), 0, 1)
            x, y, _ = b.micro(0, 0, torch.device("cpu"))
            loss = model(x, y)
            loss.backward()
            per_tp[tp] = (loss.item(), logical_grads(model, tp), init, splits)
        (l1, g1, w1, _), (l2, g2, w2, splits2) = per_tp[1], per_tp[2]
        w3 = _zero3_weights(plan, 1)
        res[f"{flavour}-tie{int(tie)}"] = {
            "loss_tp1": l1,
            "loss_tp2": l2,
            "max_grad_abs_diff": max((g1[n] - g2[n]).abs().max().item() for n in g1),
            "max_grad_abs": max(g.abs().max().item() for g in g1.values()),
            "same_names": sorted(g1) == sorted(g2),
            "init_tensors": len(w1),
            "init_tp2_mismatched": _mismatched(w1, w2),
            "init_zero3_dp2_mismatched": _mismatched(w1, w3),
            "split_not_as_table": sorted(n for n, d in splits2.items() if d != partition_dim(n)),
        }
    return res


def zero_match(prefix: str, out: str) -> dict:
    """ZeRO 1/2/3 x fp32/bf16 at this world size (TP=2 when 4 ranks) vs the plain-PyTorch loop."""
    from megagrow.bench import PlainLoop
    from megagrow.train import train_stage

    tp = 2 if WORLD == 4 else 1
    res = {"runs": {}}
    for dtype in ("fp32", "bf16"):
        for zero in (1, 2, 3):
            ds = "ds_configs/cpu.json" if zero == 3 else None
            plan = tiny_plan(prefix, tp=tp, dp=WORLD // tp, zero_stage=zero, dtype=dtype, ds_config=ds)
            run_dir = os.path.join(out, f"{dtype}-z{zero}")
            rc = train_stage(plan, 0, run_dir, quiet=True)
            torch.distributed.barrier()
            res["runs"][f"{dtype}-z{zero}"] = {"rc": rc, "losses": [r["loss"] for r in read_log(run_dir)] if RANK == 0 else None}
    init_distributed(Layout(tp=1, dp=WORLD))
    if tp == 2:  # initial weights: ZeRO-3 at TP=2 x DP=2 (deepspeed.zero.Init) == TP=1, bitwise
        from megagrow.model.gpt import build_model

        plan = tiny_plan(prefix, flavour="llama_gqa", tie=False)
        w1 = logical_params(build_model(plan.stages[0].model, plan.seed), 1)
        res["init_zero3_tp2_dp2_mismatched"] = _mismatched(w1, _zero3_weights(plan, 2))
        res["init_tensors"] = len(w1)
        init_distributed(Layout(tp=1, dp=WORLD))
    if RANK == 0:
        plan = tiny_plan(prefix, tp=tp, dp=WORLD // tp)
        ref = PlainLoop(plan, 0)
        res["reference"] = [ref.step() for _ in range(plan.stages[0].steps)]
    torch.distributed.barrier()
    return res


def resume(prefix: str, out: str) -> dict:
    """Uninterrupted 8 steps vs 4 steps + save + fresh engine resume to 8, same layout."""
    from megagrow.train import train_stage

    res = {}
    for tp in (1, 2):
        for zero in (2, 3):
            ds = "ds_configs/cpu.json" if zero == 3 else None
            plan = tiny_plan(prefix, steps=8, tp=tp, dp=WORLD // tp, zero_stage=zero, ds_config=ds, dropout=0.1)
            key = f"tp{tp}-dp{WORLD // tp}-z{zero}"
            a, b = os.path.join(out, key, "a"), os.path.join(out, key, "b")
            train_stage(plan, 0, a, quiet=True)
            train_stage(plan, 0, b, stop_at=4, quiet=True)
            torch.distributed.barrier()
            train_stage(plan, 0, b, quiet=True)
            torch.distributed.barrier()
            if RANK == 0:
                res[key] = {"uninterrupted": [r["loss"] for r in read_log(a)], "resumed": [r["loss"] for r in read_log(b)],
                            "steps_resumed": [r["step"] for r in read_log(b)]}
    return res



def _logical_all(ck) -> dict:
    return {(n, s): ck.read_box(n, s, tuple((0, d) for d in shape))
            for n, shape in ck.logical_shapes().items() for s in ("w", "m", "v")}


def reshard(prefix: str, out: str) -> dict:
    """Train at layout A, regrow (identity) to layouts B; every fp32 weight and Adam moment of B,
    read back through megagrow's reader and (TP=1) DeepSpeed's zero_to_fp32, equals A's bitwise."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megagrow.state.checkpoint import SourceCheckpoint
    from megagrow.state.executor import regrow
    from megagrow.train import train_stage

    pairs = [
        (dict(tp=1, dp=2, zero_stage=2), dict(tp=2, dp=1, zero_stage=3)),
        (dict(tp=2, dp=1, zero_stage=1), dict(tp=1, dp=2, zero_stage=3)),
        (dict(tp=1, dp=2, zero_stage=3), dict(tp=1, dp=2, zero_stage=1)),
        (dict(tp=2, dp=1, zero_stage=3), dict(tp=1, dp=2, zero_stage=2, dtype="bf16")),
        (dict(tp=1, dp=2, zero_stage=2, dtype="bf16"), dict(tp=2, dp=1, zero_stage=2, dtype="bf16")),
    ]
    import random

    rng = random.Random(int(os.environ.get("MEGAGROW_PROPERTY_SEED", "0")))
    models = [None] * len(pairs)
    for _ in range(3):  # property cases: random small model and random layouts A != B
        lay = lambda: dict(tp=rng.choice([1, 2]), zero_stage=rng.choice([1, 2, 3]), dtype=rng.choice(["fp32", "bf16"]))  # noqa: E731
        a, b = lay(), lay()
        while b == a:
            b = lay()
        for L in (a, b):
            L["dp"] = WORLD // L["tp"]
        h = rng.choice([2, 4])
        models.append(dict(flavour=rng.choice(["gpt2", "llama"]), n_layers=rng.choice([1, 2, 3]), d_model=16 * h * rng.choice([1, 2]),
                           n_heads=h, tie_embeddings=rng.choice([True, False])))
        pairs.append((a, b))
    res = {}
    for i, (a, b) in enumerate(pairs):
        ds = lambda L: "ds_configs/cpu.json" if L["zero_stage"] == 3 else None  # noqa: E731
        pa = tiny_plan(prefix, steps=3, ds_config=ds(a), **a)
        pb = tiny_plan(prefix, steps=3, ds_config=ds(b), **b)
        if models[i]:
            pa, pb = (p.replace(stages=(p.stages[0].replace(model=p.stages[0].model.replace(**models[i])),)) for p in (pa, pb))
        ra, rb = os.path.join(out, f"{i}a"), os.path.join(out, f"{i}b")
        train_stage(pa, 0, ra, quiet=True)
        torch.distributed.barrier()
        src = SourceCheckpoint.open(os.path.join(ra, "s0", "checkpoints"))
        init_distributed(pb.stages[0].layout)
        info = regrow(pb, 0, src, os.path.join(rb, "s0", "checkpoints"))
        torch.distributed.barrier()
        key = f"{models[i] or 'tiny'}: {a} -> {b}"
        both = torch.tensor([float(info["bytes_read"]), float(info["bytes_written_state"])])
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        r = {"max_read_over_share": (both[0] / both[1]).item()}
        # files this rank opened (metadata file + optimizer files) vs the optimizer files its boxes need
        opens = [None] * WORLD
        torch.distributed.all_gather_object(opens, (len(src.opened), len(src.needed_files()), a["tp"] * a["dp"]))
        r["opens"] = opens
        if RANK == 0:
            A = _logical_all(SourceCheckpoint.open(os.path.join(ra, "s0", "checkpoints")))
            B = _logical_all(SourceCheckpoint.open(os.path.join(rb, "s0", "checkpoints")))
            r["mismatched"] = sorted(f"{n}/{s}" for (n, s) in A if not torch.equal(A[(n, s)], B[(n, s)]))
            r["tensors"] = len(A)
            if b["tp"] == 1:  # DeepSpeed's own reader agrees with megagrow's
                sd = get_fp32_state_dict_from_zero_checkpoint(os.path.join(rb, "s0", "checkpoints"))
                r["zero_to_fp32_mismatched"] = sorted(n for n, t in sd.items() if not torch.equal(t.float(), A[(n, "w")]))
        res[key] = r
    return res


def r1_cases(n: int, seed: int, per_source: int) -> list[dict]:
    """R1 property cases, drawn from `seed`: ceil(n / per_source) sources, each a random small model
    (flavour, depth, heads, width, tied or not, llama GQA, explicit d_ff) trained at a random layout A
    (TP x DP x ZeRO 1-3 x fp32/bf16 at this world size, any the model allows), each converted into
    `per_source` random layouts B != A (n cases in all)."""
    import itertools
    import random

    from megagrow.errors import UserError

    rng = random.Random(seed)
    every = [dict(tp=t, zero_stage=z, dtype=d) for t, z, d in
             itertools.product([t for t in (1, 2, 4) if WORLD % t == 0], (1, 2, 3), ("fp32", "bf16"))]
    sources, left = [], n
    while left > 0:
        h = rng.choice([2, 4, 8])
        flavour = rng.choice(["gpt2", "llama"])
        m = dict(flavour=flavour, n_layers=rng.choice([1, 2, 3]), d_model=8 * h * rng.choice([1, 2]), n_heads=h,
                 tie_embeddings=rng.choice([True, False]), seq_len=16)
        if flavour == "llama" and rng.random() < 0.3:
            m["n_kv_heads"] = rng.choice([k for k in (1, 2, 4) if h % k == 0 and k < h])
        if rng.random() < 0.3:
            m["d_ff"] = 32 * rng.choice([2, 3, 4])
        model = ModelConfig(vocab_size=512, **m)
        ok = []
        for L in every:
            try:
                Layout(dp=WORLD // L["tp"], **L).check_model(model)
                ok.append(L)
            except UserError:
                pass
        if len(ok) < 2:
            continue
        a = rng.choice(ok)
        targets = [rng.choice([b for b in ok if b != a]) for _ in range(min(per_source, left))]
        left -= len(targets)
        sources.append({"model": m, "a": a, "targets": targets})
    return sources


def reshard_property(prefix: str, out: str) -> dict:
    """R1: for every case, identity regrow (pure resharding) from layout A to layout B, and every fp32
    weight, exp_avg and exp_avg_sq of B, read back through megagrow's shard-map reader, equals A's
    bitwise. One launch trains each source once and converts it into several targets.
    Knobs: MEGAGROW_R1_CASES (default 30), MEGAGROW_R1_PER_SOURCE (default 6), MEGAGROW_PROPERTY_SEED."""
    import shutil
    import time

    from megagrow.state.checkpoint import SourceCheckpoint
    from megagrow.state.executor import regrow
    from megagrow.train import train_stage

    n = int(os.environ.get("MEGAGROW_R1_CASES", "30"))
    per = int(os.environ.get("MEGAGROW_R1_PER_SOURCE", "6"))
    seed = int(os.environ.get("MEGAGROW_PROPERTY_SEED", "0"))
    ds = lambda L: "ds_configs/cpu.json" if L["zero_stage"] == 3 else None  # noqa: E731
    t0 = time.perf_counter()
    res = {"cases": [], "seed": seed}
    for i, src_case in enumerate(r1_cases(n, seed, per)):
        a = dict(src_case["a"], dp=WORLD // src_case["a"]["tp"])
        pa = tiny_plan(prefix, steps=2, ds_config=ds(a), **a)
        pa = pa.replace(stages=(pa.stages[0].replace(model=pa.stages[0].model.replace(**src_case["model"])),))
        ra = os.path.join(out, f"src{i}")
        init_distributed(pa.stages[0].layout)
        train_stage(pa, 0, ra, quiet=True)
        torch.distributed.barrier()
        ck_a = os.path.join(ra, "s0", "checkpoints")
        A = _logical_all(SourceCheckpoint.open(ck_a)) if RANK == 0 else None
        for j, b in enumerate(src_case["targets"]):
            b = dict(b, dp=WORLD // b["tp"])
            pb = pa.replace(stages=(pa.stages[0].replace(layout=pa.stages[0].layout.replace(**b, ds_config=ds(b))),))
            rb = os.path.join(out, f"src{i}_t{j}")
            init_distributed(pb.stages[0].layout)
            regrow(pb, 0, SourceCheckpoint.open(ck_a), rb)
            torch.distributed.barrier()
            if RANK == 0:
                B = _logical_all(SourceCheckpoint.open(rb))
                mism = sorted(f"{k[0]}/{k[1]}" for k in A if k not in B or not torch.equal(A[k], B[k]))
                res["cases"].append({"model": src_case["model"], "a": a, "b": b, "tensors": len(A), "mismatched": mism,
                                     "states": sorted({k[1] for k in A})})
                shutil.rmtree(rb, ignore_errors=True)
            torch.distributed.barrier()
        if RANK == 0:
            shutil.rmtree(ra, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t0
    return res


def _eval_loss(plan: Plan, k: int, ckpt_dir: str, x, y, tag=None) -> float:
    """Loss of stage k's checkpoint on batch (x, y), loaded in a plain DeepSpeed engine at its layout."""
    from megagrow.parallel.engine import build_stage as build

    init_distributed(plan.stages[k].layout)
    engine, _ = build(plan, k)
    engine.load_checkpoint(ckpt_dir, tag=tag)
    engine.eval()
    with torch.no_grad():
        return engine(x, y).item()


def grow(prefix: str, out: str) -> dict:
    """Stage 0 at layout A -> stage 1 (grown) at layout B through the trainer's transition:
    (1) the regrown checkpoint equals the growth map applied to the gathered source, bitwise, for
    w, m, v; (2) eval loss before == after; (3) training goes on at B."""
    from megagrow.growth.maps import apply_map
    from megagrow.growth.ops import operator_between
    from megagrow.state.checkpoint import SourceCheckpoint
    from megagrow.data.batches import Batches
    from megagrow.train import train_stage

    cases = [
        ("width", dict(d_model=128, n_heads=8), dict(tp=1, dp=2, zero_stage=2), dict(tp=2, dp=1, zero_stage=3)),
        ("depth", dict(n_layers=4), dict(tp=2, dp=1, zero_stage=1), dict(tp=1, dp=2, zero_stage=2)),
        ("ffn", dict(d_ff=384), dict(tp=1, dp=2, zero_stage=3), dict(tp=2, dp=1, zero_stage=2)),
        ("heads", dict(n_heads=6), dict(tp=2, dp=1, zero_stage=2), dict(tp=1, dp=2, zero_stage=3)),
    ]
    extra = [  # the other operators, one flavour each
        ("gpt2", "depth:append", dict(n_layers=4), dict(tp=1, dp=2, zero_stage=1), dict(tp=2, dp=1, zero_stage=3)),
        ("llama", "stack", dict(n_layers=4), dict(tp=2, dp=1, zero_stage=3), dict(tp=1, dp=2, zero_stage=1)),
        ("gpt2", "width", dict(d_model=192, n_heads=12), dict(tp=2, dp=1, zero_stage=2), dict(tp=1, dp=2, zero_stage=2)),
        # grouped-query attention (2 K/V heads): width and heads growth keep the group size
        ("llama_gqa", "width", dict(d_model=128, n_heads=8, n_kv_heads=4), dict(tp=1, dp=2, zero_stage=2), dict(tp=2, dp=1, zero_stage=3)),
        ("llama_gqa", "heads", dict(n_heads=8, n_kv_heads=4), dict(tp=2, dp=1, zero_stage=2), dict(tp=1, dp=2, zero_stage=1)),
    ]
    res = {}
    for flavour, spec, grown, a, b in [(f, *c) for f in ("gpt2", "llama") for c in cases] + extra:
        if True:
            base = tiny_plan(prefix, flavour=flavour, steps=3, **a, ds_config="ds_configs/cpu.json" if a["zero_stage"] == 3 else None)
            s0 = base.stages[0]
            m1 = s0.model.replace(**grown)
            s1 = s0.replace(name="s1", model=m1, grow=spec, layout=s0.layout.replace(
                **b, ds_config="ds_configs/cpu.json" if b["zero_stage"] == 3 else None))
            plan = base.replace(stages=(s0, s1))
            run = os.path.join(out, f"{flavour}-{spec}-{m1.d_model}x{m1.n_layers}".replace(":", "_"))
            init_distributed(s0.layout)
            train_stage(plan, 0, run, quiet=True)
            train_stage(plan, 1, run, quiet=True, stop_at=2)  # transition at start-up, then 2 steps on the grown engine
            torch.distributed.barrier()
            # the same 2 steps the old way: a fresh engine loading the transition's checkpoint
            again = run + "-resumed"
            copy_transition(run, again)
            train_stage(plan, 1, again, quiet=True, stop_at=2)
            torch.distributed.barrier()
            key = f"{flavour}-{spec}-{m1.d_model}x{m1.n_layers}"
            r = {"exact": spec != "stack"}
            c0, c1 = os.path.join(run, "s0", "checkpoints"), os.path.join(run, "s1", "checkpoints")
            bt = Batches.open(plan, s0.replace(layout=s0.layout.replace(tp=1, dp=1, micro_batch=4, grad_accum=1)), 0, 1)
            x, y, _ = bt.micro(10_000, 0, torch.device("cpu"))
            r["loss_before"] = _eval_loss(plan, 0, c0, x, y)
            r["loss_after"] = _eval_loss(plan, 1, c1, x, y, tag="step_00000000")
            if RANK == 0:
                src = SourceCheckpoint.open(c0)
                grown_ck = SourceCheckpoint.open(c1, "step_00000000")
                op = operator_between(spec, s0.model, m1)
                tensors = op.tensors(s0.model, m1)
                mism = []
                for st in ("w", "m", "v"):
                    old = {n: src.read_box(n, st, tuple((0, d) for d in sh)) for n, sh in src.logical_shapes().items()}
                    new = apply_map(tensors, old, st, plan.seed)
                    for n, t in new.items():
                        got = grown_ck.read_box(n, st, tuple((0, d) for d in t.shape))
                        if not torch.equal(got, t):
                            mism.append(f"{n}/{st}")
                r["mismatched"] = mism
                r["tensors"] = len(tensors)
                r["adam_step"] = [src.adam_step(), grown_ck.adam_step()]
                r["sample_offset"] = grown_ck.client["sample_offset"]
                r["losses_s1"] = [x["loss"] for x in map(json.loads, open(os.path.join(run, "s1", "log.jsonl"))) if "loss" in x]
                r["losses_s1_resumed"] = [x["loss"] for x in map(json.loads, open(os.path.join(again, "s1", "log.jsonl")))
                                          if "loss" in x]
            res[key] = r
    return res


def _records(run_dir: str, stage: str) -> list[dict]:
    with open(os.path.join(run_dir, stage, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def copy_transition(run: str, again: str, stage: str = "s1", tag: str = "step_00000000") -> None:
    """Rank 0 copies the checkpoint a transition wrote (`stage`'s `tag`) into a fresh run dir `again`,
    as its only and latest checkpoint, so a fresh engine there loads it; every rank waits for it."""
    if RANK == 0:
        import shutil

        shutil.copytree(os.path.join(run, stage, "checkpoints", tag), os.path.join(again, stage, "checkpoints", tag))
        with open(os.path.join(again, stage, "checkpoints", "latest"), "w") as f:
            f.write(tag)
    torch.distributed.barrier()


def loss_tp(prefix: str, out: str) -> dict:
    """The loss at TP=2 (2 ranks) vs TP=1 on the same logical weights and tokens: gpt2 with its real
    logits made strongly negative (head rows zero past the vocabulary, as after an import: vocab 300,
    and vocab 50, where rank 1's shard is all padding), llama untied, llama at vocab 256 (no padding).
    Reference: cross entropy over the gathered real-vocabulary logits."""
    import torch.nn.functional as F
    from megatron.core import parallel_state

    from megagrow.model.gpt import build_model
    from megagrow.model.tp import tp_slice
    from megagrow.model.loss import reference_loss

    res = {}
    for flavour, tie, vocab in (("gpt2", True, 300), ("gpt2", True, 50), ("llama", False, 300), ("llama", True, 256)):
        c = ModelConfig(flavour=flavour, n_layers=2, d_model=64, n_heads=4, vocab_size=vocab, seq_len=16, tie_embeddings=tie)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, vocab, (3, 16), generator=g), torch.randint(0, vocab, (3, 16), generator=g)
        init_distributed(Layout(tp=1, dp=WORLD))
        m1 = build_model(c, 7)
        with torch.no_grad():
            if flavour == "gpt2":  # ln_f outputs ~10 u; real head rows get -3 u: real logits ~ -30, padded rows 0
                u = F.normalize(torch.randn(c.d_model, generator=g), dim=0)
                m1.ln_f.weight.mul_(0.01)
                m1.ln_f.bias.copy_(10 * u)
                m1.head_weight()[vocab:] = 0
                m1.head_weight()[:vocab] += -3 * u
        loss1 = m1(x, y)
        loss1.backward()
        full = {n: p.detach().clone() for n, p in m1.named_parameters()}
        g1 = {n: p.grad for n, p in m1.named_parameters()}
        init_distributed(Layout(tp=2, dp=WORLD // 2))
        m2 = build_model(c, 7)
        with torch.no_grad():
            for n, p in m2.named_parameters():
                p.copy_(tp_slice(full[n], p, 2, parallel_state.get_tensor_model_parallel_rank()))
            lg = m2.logits(x)
            parts = [torch.empty_like(lg) for _ in range(2)]
            torch.distributed.all_gather(parts, lg.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            lg = torch.cat(parts, -1)
            ref, unmasked = reference_loss(lg, y, vocab).item(), F.cross_entropy(lg.flatten(0, 1), y.flatten()).item()
            eval2 = m2(x, y).item()
        loss2 = m2(x, y)
        loss2.backward()
        g2 = logical_grads(m2, 2)
        res[f"{flavour}-v{vocab}"] = {
            "loss_tp1": loss1.item(), "loss_tp2": loss2.item(), "loss_tp2_eval": eval2, "reference": ref, "unmasked": unmasked,
            "real_logit_max": lg[..., :vocab].max().item(),
            "max_grad_abs_diff": max((g1[n] - g2[n]).abs().max().item() for n in g1),
            "max_grad_abs": max(g.abs().max().item() for g in g1.values()),
            "padded_row_grad_max": g2["tok_emb.weight" if tie else "lm_head.weight"][vocab:].abs().max().item() if c.padded_vocab > vocab else 0.0}
    return res


def measure(prefix: str, out: str) -> dict:
    """Eval loss and the FLOP ledger, for real: (1) the eval loss of the same initial weights at
    TP1xDP2 (ZeRO-2, mb 2), TP2xDP1 (ZeRO-1, mb 3), TP1xDP2 (ZeRO-3, mb 5) vs a plain single-process
    loop over the same window list; (2) training with evals every 2 steps vs no evals (dropout on):
    the same losses; (3) s0 -> s1 (width, TP2) -> s2 (depth, DP2 ZeRO-3) through the trainer's
    transitions, s1 stopped at step 2 and resumed: eval records, ledger; (4) data without a
    validation split: eval off, said once."""
    import contextlib
    import io
    import shutil

    from megagrow.data.evalset import EvalSet
    from megagrow.metrics.evaluate import evaluate
    from megagrow.parallel.engine import build_stage
    from megagrow.parallel.groups import dp_rank_size
    from megagrow.train import train_stage
    from megatron.core import parallel_state as ps

    res = {}
    base = tiny_plan(prefix, dropout=0.1)
    base = base.replace(stages=(base.stages[0].replace(eval_tokens=4096),))
    s0 = base.stages[0]
    es, _ = EvalSet.open(prefix, s0.model.seq_len, s0.eval_tokens, s0.model.vocab_size)
    res["eval_windows"] = es.num_windows
    # (1) layout independence
    vals = {}
    for lay in (dict(tp=1, dp=2, zero_stage=2, micro_batch=2), dict(tp=2, dp=1, zero_stage=1, micro_batch=3),
                dict(tp=1, dp=2, zero_stage=3, micro_batch=5, ds_config="ds_configs/cpu.json")):
        p = base.replace(stages=(s0.replace(layout=s0.layout.replace(grad_accum=1, **lay)),))
        init_distributed(p.stages[0].layout)
        engine, _ = build_stage(p, 0)
        r, n = dp_rank_size()
        vals[f"tp{lay['tp']}-dp{lay['dp']}-z{lay['zero_stage']}-mb{lay['micro_batch']}"] = evaluate(
            engine, es, r, n, ps.get_data_parallel_group(), lay["micro_batch"], engine.device)
        engine.destroy()
    init_distributed(Layout(tp=1, dp=2))
    if RANK == 0:
        from megagrow.model.gpt import build_model

        model = build_model(s0.model, base.seed).eval()
        with torch.no_grad():
            tot = sum(model(torch.from_numpy(w[:, :-1]).contiguous(), torch.from_numpy(w[:, 1:]).contiguous()).double().item()
                      * len(w) * s0.model.seq_len for w in (es.windows(es.window_ids[i:i + 7]) for i in range(0, es.num_windows, 7)))
        vals["plain-single-process"] = tot / es.num_tokens
    res["layouts"] = vals
    torch.distributed.barrier()
    # (2) evals do not disturb training
    losses = {}
    for every, tokens in ((2, 4096), (0, 0)):
        p = base.replace(stages=(s0.replace(eval_every=every, eval_tokens=tokens),))
        run = os.path.join(out, f"evalevery{every}")
        train_stage(p, 0, run, quiet=True)
        torch.distributed.barrier()
        if RANK == 0:
            recs = _records(run, "s0")
            losses[every] = {"train": [r["loss"] for r in recs if "loss" in r],
                             "evals": [(r["step"], r["at"]) for r in recs if "eval_loss" in r]}
    res["disturb"] = losses
    # (3) a staged run through real transitions
    st0 = s0.replace(steps=4, eval_every=2, log_every=1)
    st1 = st0.replace(name="s1", grow="width", model=st0.model.replace(d_model=128, n_heads=8),
                      layout=st0.layout.replace(tp=2, dp=1, zero_stage=1), steps=4)
    st2 = st0.replace(name="s2", grow="depth", model=st1.model.replace(n_layers=4),
                      layout=st0.layout.replace(tp=1, dp=2, zero_stage=3, ds_config="ds_configs/cpu.json"), steps=2)
    plan = base.replace(stages=(st0, st1, st2))
    run = os.path.join(out, "staged")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_stage(plan, 0, run, quiet=False)
        train_stage(plan, 1, run, stop_at=2, quiet=False)
        torch.distributed.barrier()
        train_stage(plan, 1, run, quiet=False)  # resumed at step 2
        train_stage(plan, 2, run, quiet=False)
    torch.distributed.barrier()
    if RANK == 0:
        from megagrow.metrics.flops import flops_per_token

        res["staged"] = {n: _records(run, n) for n in ("s0", "s1", "s2")}
        res["staged_printed"] = [line for line in printed.getvalue().splitlines() if "eval" in line]
        res["per_step"] = {st.name: [st.layout.global_batch * st.model.seq_len,
                                     st.layout.global_batch * st.model.seq_len * flops_per_token(st.model)]
                           for st in plan.stages}
        res["tb_files"] = sorted(f for f in os.listdir(os.path.join(run, "s0")) if f.startswith("events.out.tfevents"))
        with open(os.path.join(run, "s1", "status.json")) as f:
            res["s1_status"] = json.load(f)
    # (4) data prepared without a validation split
    bare = os.path.join(out, "bare")
    if RANK == 0:
        for ext in (".bin", ".idx"):
            shutil.copy(prefix + ext, bare + ext)
    torch.distributed.barrier()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_stage(base.replace(data=base.data.replace(prefix=bare), stages=(s0.replace(steps=2),)), 0,
                    os.path.join(out, "bare_run"), quiet=False)
    torch.distributed.barrier()
    if RANK == 0:
        res["bare_printed"] = printed.getvalue().splitlines()
        res["bare_records"] = _records(os.path.join(out, "bare_run"), "s0")
    return res


def nccl_declared(prefix: str, out: str) -> dict:
    """Save, resume, a width transition (TP 1 -> 2) and tools/regrow.py, on groups declared NCCL
    (tests/dist/nccl_check.py: a CPU tensor reaching a declared-NCCL group from megagrow raises).
    Writes result.json itself: the regrow, last, ends its ranks (megagrow.procs.exit_rank); each
    rank's checked calls go to seen_rank<R>.json at exit."""
    import atexit

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import nccl_check

    nccl_check.install()
    from megagrow import collectives
    from megagrow.cli.regrow import main as regrow_main
    from megagrow.train.loop import train_stage

    def dump_seen():
        with open(os.path.join(out, f"seen_rank{RANK}.json"), "w") as f:
            json.dump(dict(nccl_check.SEEN), f)

    atexit.register(dump_seen)
    base = tiny_plan(prefix, steps=2)
    s0 = base.stages[0].replace(save_every=1, eval_every=1)
    s1 = s0.replace(name="s1", grow="width", model=s0.model.replace(d_model=128, n_heads=8),
                    layout=s0.layout.replace(tp=2, dp=1, zero_stage=1))
    plan = base.replace(stages=(s0, s1))
    run = os.path.join(out, "run")
    rcs = [train_stage(plan, 0, run, stop_at=1, quiet=True),  # save at step 1
           train_stage(plan, 0, run, quiet=True),  # resume (checksums verified), step 2, save
           train_stage(plan, 1, run, quiet=True)]  # transition (grow + reshard + seal), 2 steps, save
    side = collectives.side_group()
    res = {"rcs": rcs, "side_group_is_gloo": side is not None and "gloo" in str(torch.distributed.get_backend(side)),
           "steps": {n: [r["step"] for r in map(json.loads, open(os.path.join(run, n, "log.jsonl"))) if "loss" in r]
                     for n in ("s0", "s1")}}
    plan_file = os.path.join(out, "plan.yaml")
    if RANK == 0:
        with open(plan_file, "w") as f:
            json.dump(plan.to_dict(), f)  # JSON is YAML
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(res, f)
    collectives.barrier()
    rc = regrow_main(["--src", os.path.join(run, "s0", "checkpoints"), "--plan", plan_file, "--to-stage", "s1",
                      "--out", os.path.join(out, "regrown"), "--json"])
    raise SystemExit(f"regrow returned {rc} instead of ending the rank")


if __name__ == "__main__":
    scenario, prefix, out = sys.argv[1:4]
    result = {"tp_equiv": tp_equiv, "zero_match": zero_match, "resume": resume, "reshard": reshard, "grow": grow,
              "reshard_property": reshard_property, "measure": measure, "nccl_declared": nccl_declared,
              "loss_tp": loss_tp}[scenario](prefix, out)
    if RANK == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
