"""Initial-weight time: drawing each rank's own shard (megagrow) vs drawing every whole tensor.

    python bench/init_time.py [--layers 24 --d-model 1024 --heads 16 --vocab 50257 --seq 1024]
                              [--layouts 8x1,8x4,8x32] [--repeats 3] [--json]
    torchrun --nproc_per_node=2 bench/init_time.py --zero3 [...]    # ZeRO-3 build, per rank

One process (default), GPT-2 medium shapes (355M parameters), TP=1, side by side, best of
--repeats alternating rounds:

  build        GPT(config): megatron layers allocating their (uninitialised) parameters
  build_meta   the same on the meta device (no allocation), for comparison
  full_draw    the previous scheme: each parameter's whole logical tensor from torch.randn
               with a generator seeded by (seed, name), this rank's slice copied in
  shard_draw   megagrow's init_weights: each entry from megagrow.rng, keyed by (seed, name,
               index), only the entries this rank holds

Per-rank work at a larger layout (--layouts TPxDP, ZeRO-3 partitions over DP): the time to
draw what rank 0 of that layout holds (its TP slice of each tensor, then its flat ZeRO-3
partition), without building the layout; the previous scheme drew every whole tensor on
every rank, i.e. full_draw at any layout.

--zero3 (under torchrun, W ranks): the model built as the trainer builds it at ZeRO-3 DP=W
(inside deepspeed.zero.Init, each rank draws its partition) vs plain on every rank; time and
the process's peak resident memory (ru_maxrss) after each, plain measured last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _config(a):
    from megagrow.config import ModelConfig

    return ModelConfig(flavour=a.flavour, n_layers=a.layers, d_model=a.d_model, n_heads=a.heads, vocab_size=a.vocab, seq_len=a.seq)


def full_draw(model, seed: int) -> None:
    """The previous initialisation: whole logical tensor per parameter, TP=1 (the slice is all of it)."""
    from megagrow import params

    c = model.config
    with torch.no_grad():
        for name, p in model.named_parameters():
            init = params.rule(name).init
            if init in ("zeros", "ones"):
                p.fill_(0.0 if init == "zeros" else 1.0)
                continue
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
            p.copy_(torch.randn(tuple(p.shape), generator=g) * params.init_std(c, name))


def rank0_draw(c, tp: int, dp: int, seed: int) -> int:
    """Draw what rank 0 of TP=tp x DP=dp (ZeRO-3) holds; returns the number of entries drawn."""
    from megagrow import params, rng
    from megagrow.model.tp import shard_box

    n_drawn = 0
    for name, shape in params.logical_tensors(c).items():
        box = shard_box(shape, params.partition_dim(name), tp, 0)
        part = math.ceil(math.prod(rng.box_shape(box)) / dp)
        out = torch.empty(part)
        if params.rule(name).init.startswith("normal"):
            rng.fill_range(out, "normal", seed, name, tuple((0, n) for n in shape), box, 0, params.init_std(c, name))
        n_drawn += part
    return n_drawn


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def single(a) -> dict:
    from megagrow.config import Layout
    from megagrow.model.gpt import GPT, init_weights
    from megagrow.parallel.groups import init_distributed

    init_distributed(Layout())
    c = _config(a)
    best: dict = {}
    model = None
    for _ in range(a.repeats):
        del model
        t = {}
        t0 = time.perf_counter()
        model = GPT(c)
        t["build"] = time.perf_counter() - t0
        with torch.device("meta"):
            t["build_meta"] = _timed(lambda: GPT(c))
        t["full_draw"] = _timed(lambda: full_draw(model, 7))
        t["shard_draw"] = _timed(lambda: init_weights(model, 7))
        for tp, dp in a.layouts:
            t[f"rank0_draw_tp{tp}_dp{dp}"] = _timed(lambda: rank0_draw(c, tp, dp, 7))
        for k, v in t.items():
            best[k] = min(best.get(k, v), v)
    return {
        "params": c.num_params(),
        "config": c.to_dict(),
        "repeats": a.repeats,
        "seconds_best": best,
        "shard_over_full": best["shard_draw"] / best["full_draw"],
        "threads": torch.get_num_threads(),
    }


def zero3(a) -> dict:
    from megagrow import collectives
    from megagrow.config import Layout, OptimConfig, Stage
    from megagrow.model.gpt import GPT, init_weights
    from megagrow.parallel.engine import _zero3_init, ds_config
    from megagrow.parallel.groups import init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    lay = Layout(tp=1, dp=world, zero_stage=3, micro_batch=1)
    init_distributed(lay)
    c = _config(a)
    st = Stage(name="s", model=c, layout=lay, optim=OptimConfig())
    cfg = ds_config(st)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # noqa: E731  GiB (ru_maxrss in KiB)
    base = rss()
    t0 = time.perf_counter()
    with _zero3_init(cfg):
        m = GPT(c)
    t1 = time.perf_counter()
    init_weights(m, 7)
    t2 = time.perf_counter()
    peak_z3 = rss()
    held = sum(p.ds_tensor.numel() for p in m.parameters())
    del m
    t3 = time.perf_counter()
    m = GPT(c)
    t4 = time.perf_counter()
    init_weights(m, 7)
    t5 = time.perf_counter()
    out = {
        "rank": int(os.environ.get("RANK", "0")),
        "world": world,
        "params": c.num_params(),
        "zero3_entries_held": held,
        "zero3_build_s": t1 - t0,
        "zero3_draw_s": t2 - t1,
        "zero3_peak_rss_gib": peak_z3,
        "rss_before_gib": base,
        "plain_build_s": t4 - t3,
        "plain_draw_s": t5 - t4,
        "plain_peak_rss_gib": rss(),
    }
    collectives.barrier()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1]
    )
    p.add_argument("--flavour", default="gpt2", choices=("gpt2", "llama"))
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layouts", default="8x1,8x4,8x32", help="TPxDP layouts whose rank-0 share is drawn (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--zero3", action="store_true", help="under torchrun: ZeRO-3 build (zero.Init) vs plain, per rank")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        a.layouts = [tuple(int(x) for x in s.split("x")) for s in a.layouts.split(",") if s]
    except ValueError:
        print(f"error: --layouts wants TPxDP pairs like 8x4, got {a.layouts!r}", file=sys.stderr)
        return 2
    res = zero3(a) if a.zero3 else single(a)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
