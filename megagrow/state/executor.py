"""Shard-to-shard growth and resharding.

Each rank of the new layout B builds its DeepSpeed engine for the new model, asks DeepSpeed
which fragment of which parameter it owns (ZeRO-1/2 and bf16: `param._hp_mapping`;
ZeRO-3: the param's own partition), turns that fragment into a box of the logical tensor,
evaluates the growth map's pieces on that box -- reading only the source boxes they name,
through `SourceCheckpoint` -- and copies the result into the fp32 master and Adam moments.
DeepSpeed then writes the native checkpoint. No rank materialises the whole model.

The same code serves `tools/regrow.py` and the trainer's stage transition. The growth decision
(megagrow/state/decision.py) is made once per transition and passed down; what each rank reads is
planned in megagrow/state/reads.py; a resume at the checkpoint's own layout is megagrow/state/resume.py.
"""

from __future__ import annotations

import os
import time

import torch

from megagrow import collectives
from megagrow.config import Plan
from megagrow.params import partition_dim
from megagrow.paths import tag_of
from megagrow.state.checkpoint import STATE_KEYS, SourceCheckpoint
from megagrow.state.decision import Growth, decide_for


def fp32_partitions(optimizer) -> list:
    """This rank's flat fp32 master partitions (what Adam updates and checkpoints hold)."""
    return _fp32_partitions(optimizer)


def _fp32_partitions(optimizer) -> list:
    """This rank's flat fp32 master partitions: the tensors Adam's state is keyed on."""
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(optimizer, attr, None)
        if flats is not None:
            return list(flats)
    raise RuntimeError(f"unsupported DeepSpeed optimizer {type(optimizer).__name__}")


def init_optimizer_state(engine, optimizer) -> None:
    """Create Adam's (zero) state for this rank's flat fp32 partitions now, as its first step would,
    and link DeepSpeed's per-parameter views of it (ZeRO-1/2 make them lazily after a step)."""
    base = optimizer.optimizer
    for p in _fp32_partitions(optimizer):
        if not base.state.get(p):
            base.state[p] = {
                "step": torch.zeros((), dtype=torch.float32),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
    lazy = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if lazy is not None:
        lazy()


def _z3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


def target_fragments(engine):
    """(name, local_shape, flat_start, numel, set(state, values)) for each fragment this rank owns."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    z3 = _z3(engine)
    dp_rank = torch.distributed.get_rank(group=engine.optimizer.dp_process_group) if z3 else None
    for name, p in engine.module.named_parameters():
        if z3:
            n, P = p.ds_numel, p.ds_tensor.numel()
            start = dp_rank * P
            numel = max(0, min(P, n - start))

            def setter(state, values, p=p, P=P, numel=numel):
                full = torch.zeros(P, dtype=torch.float32, device=p.ds_tensor.device)
                full[:numel] = values
                if state == "w":
                    safe_set_local_fp32_param(p, full)
                else:
                    safe_set_local_optimizer_state(p, full, STATE_KEYS[state])

            yield name, tuple(p.ds_shape), start, numel, setter
        else:
            m = p._hp_mapping
            if m is None:
                continue

            def setter(state, values, m=m):
                frag = _zero12_fragment(engine.optimizer, m, STATE_KEYS[state])
                frag.data.copy_(values.view_as(frag).to(frag.device))

            yield name, tuple(p.shape), m.lp_fragment_address.start, m.lp_fragment_address.numel, setter


def _zero12_fragment(optimizer, m, key):
    """This rank's fp32 (key None) or Adam-moment fragment of one param, as a view into the
    flat partition (ZeRO-1/2 DeepSpeedZeroOptimizer and BF16_Optimizer store it alike)."""
    if key is None:
        return m.hp_fragment
    a = m.hp_fragment_address
    return optimizer.optimizer.state[_fp32_partitions(optimizer)[m.param_group_index]][key].narrow(0, a.start, a.numel)


def fragment_box(name: str, local_shape: tuple, start: int, numel: int, tp: int, tp_rank: int) -> tuple[tuple, int]:
    """The logical box covering elements [start, start+numel) of the flattened TP-local param
    (whole rows for a matrix), and the offset of `start` inside that box's flattening."""
    if len(local_shape) == 1:
        box, skip = [(start, start + numel)], 0
    else:
        cols = local_shape[1]
        r0, r1 = start // cols, -(-(start + numel) // cols)
        box, skip = [(r0, r1), (0, cols)], start - r0 * cols
    pd = partition_dim(name)
    if pd is not None and tp > 1:
        off = tp_rank * local_shape[pd]
        box[pd] = (box[pd][0] + off, box[pd][1] + off)
    return tuple(box), skip


def fill_engine(engine, tensors: dict, src: SourceCheckpoint, seed: int, progress: bool = False, reset_optimizer: bool = False) -> dict:
    """Write every fragment this rank owns: fp32 master, exp_avg, exp_avg_sq; then Adam's step.
    reset_optimizer: the moments are written as zeros and the step as 0 (a fresh Adam on the
    grown weights; the source's moments are not read)."""
    from megatron.core import parallel_state

    from megagrow.growth.maps import apply_tensor

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    t0, written = time.perf_counter(), 0
    lazies = {s: src.lazy(s) for s in ("w", "m", "v")}
    frags = list(target_fragments(engine))
    if progress:
        from tqdm import tqdm

        frags = tqdm(frags, desc="regrow", unit="tensor", file=__import__("sys").stderr)
    for name, shape, start, numel, setter in frags:
        if numel == 0:
            continue
        box, skip = fragment_box(name, shape, start, numel, tp, tp_rank)
        for state in ("w", "m", "v"):
            if reset_optimizer and state != "w":
                vals = torch.zeros(numel, dtype=torch.float32)
            else:
                vals = apply_tensor(tensors[name], lazies[state], state, seed, box=box).reshape(-1)[skip : skip + numel]
            setter(state, vals)
            written += numel * 4
    step = 0 if reset_optimizer else src.adam_step()
    for st in engine.optimizer.optimizer.state.values():
        if "step" in st:
            st["step"] = torch.full_like(st["step"], float(step)) if torch.is_tensor(st["step"]) else step
    if not _z3(engine):
        engine.optimizer.update_lp_params()  # the module weights are saved too (ZeRO-1/2)
    return {"bytes_written_state": written, "fill_seconds": time.perf_counter() - t0, "adam_step": step}


def sync_module_weights(engine) -> None:
    """Set the module's (low-precision) weights from the fp32 master just written, as loading a
    checkpoint does. ZeRO-1/2 did it before the save (update_lp_params); ZeRO-3 copies each fp32
    partition into its param partition, as DeepSpeed's step and checkpoint load do."""
    if _z3(engine):
        opt = engine.optimizer
        for i in range(len(opt.fp32_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(i)


def regrow(
    plan: Plan,
    k: int,
    src: SourceCheckpoint,
    out_dir: str,
    spec: str | None = None,
    progress: bool = False,
    keep_engine: bool = False,
    verify: bool = False,
    growth: Growth | None = None,
) -> dict:
    """Build stage k's engine at its layout from checkpoint `src` (of stage k-1 with growth
    `spec`, or of stage k itself: pure resharding), and save it in `out_dir` with DeepSpeed.
    Process groups must be initialised for stage k's layout. growth: the decision
    (`decision.decide_for(plan, k, src, spec)`, made here when not given); its map is used as it is.

    verify: first, the checksums of the source files the ranks will open are checked, each file once
    by a rank that opens it (`verify_reads`); info["files_verified"] counts the files this rank
    checked, info["files_unverified"] the files this rank then opened that no rank had checked (0
    unless the prediction is wrong).

    keep_engine: the engine is returned ready to train (info["engine"] = (engine, optimizer),
    info["record"] the stage record saved), its module weights equal to the fp32 master as a
    load of the saved checkpoint would leave them; else it is destroyed here."""
    from megagrow.parallel.engine import build_stage
    from megagrow.state.reads import verify_reads

    g = growth if growth is not None else decide_for(plan, k, src, spec)
    checked, verified = verify_reads(plan, k, src, g) if verify else (None, None)
    t = [time.perf_counter()]
    engine, optimizer = build_stage(plan, k, init=False)  # every weight is written below
    init_optimizer_state(engine, optimizer)
    t.append(time.perf_counter())
    info = fill_engine(engine, g.tensors, src, plan.seed, progress, reset_optimizer=g.reset)
    t.append(time.perf_counter())
    rec = _grown_record(plan, k, src, g)
    engine.global_steps = rec.step
    save_grown(engine, out_dir, tag_of(rec.step), rec.to_client_state())
    collectives.barrier()
    t.append(time.perf_counter())
    if keep_engine:
        sync_module_weights(engine)
        info.update(engine=(engine, optimizer), record=rec)
    else:
        engine.destroy()
        del engine, optimizer
    info.update(_read_info(g, rec, src, checked, verified), phase_seconds={"engine": t[1] - t[0], "fill": t[2] - t[1], "save": t[3] - t[2]})
    return info


def _read_info(g: Growth, rec, src: SourceCheckpoint, checked, verified) -> dict:
    """The fields `regrow` and `regrow_offline` report alike: the operator, the new record's step,
    what was read and what was verified (see `regrow`)."""
    opened = {os.path.basename(p) for p in src.opened[1:]}
    return {
        "op": g.describe(),
        "step": rec.step,
        "sample_offset": rec.sample_offset,
        "bytes_read": src.bytes_read,
        "files_opened": len(src.opened),
        "tag": tag_of(rec.step),
        "files_verified": len(checked or []),
        "files_unverified": None if verified is None else len(opened - set(verified)),
    }


def _grown_record(plan: Plan, k: int, src: SourceCheckpoint, g: Growth):
    """The stage record a regrow into stage k writes."""
    stage = plan.stages[k]
    if g.same_stage:  # a resume at a new layout: the stage goes on where it stopped, every field kept
        return src.record.resharded(plan, k)
    # a new stage: its step 0 continues the data stream; LR placement from the operator
    return src.record.grown(plan, k, *lr_placement(g.op, src.record.lr_offset + src.record.step, stage))


def regrow_offline(
    plan: Plan,
    k: int,
    src: SourceCheckpoint,
    out_dir: str,
    spec: str | None = None,
    progress: bool = False,
    verify: bool = False,
    growth: Growth | None = None,
) -> dict:
    """`regrow` without a DeepSpeed engine or a model: each rank of stage k's layout (global rank r:
    TP rank r % tp, DP rank r // tp, as megatron numbers them) writes its own native DeepSpeed files
    with `writer.RankWriter` (the same values, keys and dtypes as `regrow`'s engine saves); rank 0
    also `latest` and the recovery scripts. Reads exactly what `regrow` reads (`read_plan`). Needs
    only torch.distributed (gloo) when there are several ranks: at ZeRO-1/2 with dp > 1 the DP ranks
    of each TP rank gather the module weights to their DP rank 0, as DeepSpeed does; ZeRO-1/2/3
    layouts (`writer.supported`). verify, growth and the returned info as `regrow`."""
    from megagrow.parallel.engine import ds_config
    from megagrow.state.reads import verify_reads
    from megagrow.state.writer import RankWriter, write_shared

    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if dist else 0
    stage = plan.stages[k]
    g = growth if growth is not None else decide_for(plan, k, src, spec)
    t_verify = time.perf_counter()
    checked, verified = verify_reads(plan, k, src, g) if verify else (None, None)
    t_verify = time.perf_counter() - t_verify
    rec = _grown_record(plan, k, src, g)
    tag = tag_of(rec.step)
    tag_dir = os.path.join(out_dir, tag)
    os.makedirs(tag_dir, exist_ok=True)
    L = stage.layout
    dp_groups = [None] * L.tp
    if dist and L.dp > 1 and L.zero_stage in (1, 2):  # DP rank 0 of each TP rank gathers the module weights
        dp_groups = [torch.distributed.new_group([t + L.tp * d for d in range(L.dp)]) for t in range(L.tp)]
    w = RankWriter(plan, k, g.tensors, src, rank % L.tp, rank // L.tp, reset=g.reset, dp_group=dp_groups[rank % L.tp])
    info = w.write(
        tag_dir, rec.step, rec.to_client_state(), ds_config(stage), progress, adam_step=lambda: 0 if g.reset else src.adam_step()
    )
    t0 = time.perf_counter()
    if dist:
        collectives.barrier()
    if rank == 0:
        write_shared(out_dir, tag)
    if dist:
        collectives.barrier()
    info["phase_seconds"] = {
        "verify": t_verify,
        "states": info.pop("fill_seconds"),  # the optimizer file: filled and written, fragment by fragment
        "module": info.pop("save_seconds") + time.perf_counter() - t0,  # the module file, `latest`, the barriers
    }
    info.update(_read_info(g, rec, src, checked, verified), record=rec)
    return info


def lr_placement(op, pos: int, stage) -> tuple[int, int]:
    """(schedule offset, re-warmup steps) of the grown stage, from the source stage's schedule
    position `pos` (its lr_offset + step), by `stage.optim.lr_placement`:
    "paper" places it at the big model's equivalent step, the source's schedule position / c
    (the operator's paper constant: 1.776 width x2, 1.412 depth x2; operators without one keep
    the position); "keep" keeps the position; "restart" starts the schedule again at 0
    (megagrow.growth.apply.placed_position)."""
    from megagrow.growth.apply import placed_position

    o = stage.optim
    placed = placed_position(op, pos, o.lr_placement)
    return (pos if placed is None else placed), o.rewarmup_steps


def save_grown(engine, out_dir: str, tag: str, client_state: dict) -> None:
    """DeepSpeed's save of the grown (or resharded) state; a write that fails (disk full: torch.save
    says so as a RuntimeError from its zip writer) is a SaveFailed, one line naming the cause."""
    from megagrow.errors import SaveFailed
    from megagrow.state.manifest import _write_failure

    try:
        engine.save_checkpoint(out_dir, tag=tag, client_state=client_state)
    except (OSError, RuntimeError) as e:
        why = _write_failure(e, out_dir)
        if why is None:
            raise
        raise SaveFailed(f"could not write the new checkpoint {out_dir}/{tag} ({why})") from None
