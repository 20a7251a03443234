"""Resume: stage k from its own checkpoint at the same layout, through the shard reader.

Each rank builds the stage's engine and fills the fragments it owns from the same fragments of the
checkpoint, read by their flat ranges (memory-mapped; at the same layout only its own optimizer
file), bitwise what DeepSpeed's `engine.load_checkpoint` gives; `verify_resume` checks first
exactly what each rank will read.
"""

from __future__ import annotations

import os

import torch

from megagrow import collectives
from megagrow.config import Plan
from megagrow.errors import UserError
from megagrow.state.checkpoint import SourceCheckpoint
from megagrow.state.decision import check_source
from megagrow.state.executor import _z3, fp32_partitions, init_optimizer_state, sync_module_weights, target_fragments
from megagrow.state.reads import assign_verifiers, metadata_problems


def own_files(src: SourceCheckpoint, tp_rank: int, dp_rank: int) -> list[tuple[int, int]]:
    """The optimizer files (tp_rank, dp_rank) that a resume of `src` at its own layout opens on the rank
    at (tp_rank, dp_rank): those holding its own fragments, read by their flat ranges (the shard map's
    arithmetic; at the same layout that is its own file alone)."""
    out = set()
    for name, start, numel in src.map.rank_fragments(dp_rank):
        if numel > 0:
            out |= {(tp_rank, f.dp_rank) for f in src.map.overlapping(name, start, start + numel)}
    return sorted(out)


def fill_own(engine, src: SourceCheckpoint) -> dict:
    """Write every fragment this rank owns (fp32 master, exp_avg, exp_avg_sq) from the same fragment of
    `src` (a checkpoint of this stage at this layout), read by its flat range: only this rank's own
    optimizer file is opened, memory-mapped. One state at a time, the file's mapping dropped after each
    (`src.close`): the pages a rank has mapped at once stay one state's (4 B per element of its
    partition), not the whole file's 12. Then Adam's step, and the ZeRO-1/2 module weights from the fp32
    master (DeepSpeed's step leaves them equal to its cast, so they are what the module file holds)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    written = 0
    frags = [f for f in target_fragments(engine) if f[3] > 0]
    for name, shape, *_ in frags:
        if tuple(src.local_shapes.get(name, ())) != tuple(shape):
            raise UserError(
                f"{src.dir}/{src.tag}: parameter {name} has TP-local shape {src.local_shapes.get(name)}, "
                f"this stage builds {tuple(shape)}; refusing to resume"
            )
    step = None
    for state in ("w", "m", "v"):
        for name, _, start, numel, setter in frags:
            setter(state, src.read_flat(tp_rank, name, state, start, start + numel, view=True))  # the setter copies it
            written += numel * 4
        if step is None:
            step = src.adam_step()  # from a file open now (its own): every optimizer file holds it
        src.close()
    for st in engine.optimizer.optimizer.state.values():
        if "step" in st:
            st["step"] = torch.full_like(st["step"], float(step)) if torch.is_tensor(st["step"]) else step
    if not _z3(engine):
        update_lp_params_bounded(engine.optimizer)
    return {"bytes_written_state": written, "adam_step": step}


def update_lp_params_bounded(optimizer, bucket_elems: int = 1 << 18) -> None:
    """DeepSpeed's ZeRO-1/2 (and BF16_Optimizer's) update_lp_params, with the all-gather of the module
    weights done `bucket_elems` elements per rank at a time: each rank casts its fp32 partition into its
    own low-precision partition, then the partitions are gathered into the flat module buffer. The same
    bytes; but gloo's all-gather stages its whole output in a temporary buffer (DeepSpeed gathers a group
    at once: the TP-local model, 4 B/element at fp32), bounded here to dp x bucket_elems elements, twice
    (collectives.all_gather returns new tensors): 2 x dp MiB at the default 2^18."""
    parts = getattr(optimizer, "parallel_partitioned_bit16_groups", None)
    if parts is None:
        parts = optimizer.bf16_partitioned_groups
    for g, (own, fp32) in enumerate(zip(parts, fp32_partitions(optimizer))):
        group = optimizer.real_dp_process_group[g]
        pid = torch.distributed.get_rank(group=group)
        own[pid].data.copy_(fp32.data)
        if torch.distributed.get_world_size(group=group) == 1:
            continue
        n = own[pid].numel()
        with torch.no_grad():
            for s in range(0, n, bucket_elems):
                m = min(bucket_elems, n - s)
                for q, got in enumerate(collectives.all_gather(own[pid].narrow(0, s, m), group=group)):
                    if q != pid:
                        own[q].narrow(0, s, m).copy_(got)


def resume_engine(plan: Plan, k: int, src: SourceCheckpoint) -> tuple:
    """Stage k's engine with the state of `src`, its own checkpoint at its own layout, bitwise what
    `engine.load_checkpoint` gives (fp32 master, Adam moments and step, module weights, DeepSpeed's step
    and sample counters), each rank reading only its own fragments. Returns (engine, optimizer, record, fill info).
    The caller gathers ZeRO-3's persistent parameters (transition.gather_persistent)."""
    from megagrow.parallel.engine import build_stage

    if not check_source(plan, k, src):
        raise UserError(f"{src.dir}/{src.tag} is a checkpoint of stage {k - 1}, not of stage {k}; refusing to resume")
    engine, optimizer = build_stage(plan, k, init=False)  # every weight is written below
    info = load_own(engine, optimizer, src)
    return engine, optimizer, src.record, info


def load_own(engine, optimizer, src: SourceCheckpoint) -> dict:
    """Fill a freshly built engine of the checkpoint's stage and layout from `src` (`resume_engine`'s
    load, without the build)."""
    init_optimizer_state(engine, optimizer)
    info = fill_own(engine, src)
    c = src.client
    engine.global_steps = int(c["global_steps"])
    engine.global_samples = int(c.get("global_samples", engine.global_steps * engine.train_batch_size()))
    engine.skipped_steps = int(c["skipped_steps"])
    engine.loaded_checkpoint_mp_world_size = c["mp_world_size"]
    engine.loaded_checkpoint_dp_world_size = c["dp_world_size"]
    sync_module_weights(engine)
    return info


def verify_resume(src: SourceCheckpoint, tp: int) -> list[str]:
    """Before a resume reads `src` (collective over the stage's ranks): each rank checks exactly what it
    will read. Its own optimizer files (`own_files`, read whole): size and CRC-32 against the manifest,
    each file once, by one of the ranks that open it (`assign_verifiers`). The metadata file every rank
    opens (`src.opened[0]`), by rank 0: at ZeRO-3 a small file, checked whole; at ZeRO-1/2 the TP-rank-0
    module file, whose weights the resume never reads (they come from the fp32 master), so its size and
    the CRC-32 of its record entries recorded at seal time (`verify.record_problems`; a manifest
    without one: the whole file).
    Files no rank opens (the other TP ranks' module files) are only sized (when rank 0 chose the tag).
    A mismatch is one UserError on every rank (verify.verification_failed). Returns the names this
    rank checked."""
    from megagrow.state import manifest as mf
    from megagrow.state.verify import verification_failed

    rank = torch.distributed.get_rank()
    tag_dir = os.path.join(src.dir, src.tag)
    m = mf.read_manifest(tag_dir)
    mine, bad = [], []
    if m is not None:
        d, t = divmod(rank, tp)
        opens = [os.path.basename(src.path("optim", ft, fd)) for ft, fd in own_files(src, t, d)]
        every = collectives.all_gather_object(opens)
        owner = assign_verifiers(every, {n: f.get("size", 0) for n, f in m["files"].items()})
        mine = [n for n in opens if owner.get(n) == rank]
        bad = mf.problems(tag_dir, deep=True, names=mine, only=True) if mine else []
        if rank == 0:
            meta = os.path.basename(src.opened[0])
            bad += metadata_problems(src, tag_dir, meta)
            mine.insert(0, meta)
    bad = sorted({p for part in collectives.all_gather_object(bad) for p in part})
    if bad:
        verification_failed(src.dir, src.tag, bad, all_ranks=True)
    return mine
