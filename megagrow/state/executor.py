"""Shard-to-shard growth and resharding.

Each rank of the new layout B builds its DeepSpeed engine for the new model, asks DeepSpeed
which fragment of which parameter it owns (ZeRO-1/2 and bf16: `param._hp_mapping`;
ZeRO-3: the param's own partition), turns that fragment into a box of the logical tensor,
evaluates the growth map's pieces on that box -- reading only the source boxes they name,
through `SourceCheckpoint` -- and copies the result into the fp32 master and Adam moments.
DeepSpeed then writes the native checkpoint. No rank materialises the whole model.

The same code serves `tools/regrow.py` and the trainer's stage transition.
"""

from __future__ import annotations

import os
import time

import torch

from megagrow import collectives
from megagrow.config import Plan
from megagrow.errors import UserError
from megagrow.params import partition_dim
from megagrow.paths import tag_of
from megagrow.state.checkpoint import STATE_KEYS, SourceCheckpoint


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
            base.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                             "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
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


def fill_engine(engine, tensors: dict, src: SourceCheckpoint, seed: int, progress: bool = False,
                reset_optimizer: bool = False) -> dict:
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
                vals = apply_tensor(tensors[name], lazies[state], state, seed, box=box).reshape(-1)[skip:skip + numel]
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


def check_source(plan: Plan, k: int, src: SourceCheckpoint) -> bool:
    """The source must be stage k itself (pure resharding: returns True) or stage k-1 of this
    plan (growth into stage k: returns False), judged by stage name and model config."""
    stage = plan.stages[k]
    name, model = src.record.stage.name, src.model
    if name == stage.name and model == stage.model:
        return True
    if k > 0 and name == plan.stages[k - 1].name and model == plan.stages[k - 1].model:
        return False
    prev = f" or stage {k - 1} ({plan.stages[k - 1].name!r})" if k > 0 else ""
    raise UserError(f"source checkpoint is of stage {name!r} ({_short(model)}); stage {k} ({stage.name!r}) of plan "
                    f"{plan.name!r} takes a checkpoint of stage {k} itself{prev} with the model the plan gives it")


def _short(m) -> str:
    return f"{m.flavour} L={m.n_layers} d={m.d_model} H={m.n_heads}"


def regrow(plan: Plan, k: int, src: SourceCheckpoint, out_dir: str, spec: str | None = None, progress: bool = False,
           keep_engine: bool = False, verify: bool = False) -> dict:
    """Build stage k's engine at its layout from checkpoint `src` (of stage k-1 with growth
    `spec`, or of stage k itself: pure resharding), and save it in `out_dir` with DeepSpeed.
    Process groups must be initialised for stage k's layout.

    verify: first, the checksums of the source files the ranks will open are checked, each file once
    by a rank that opens it (`verify_reads`); info["files_verified"] counts the files this rank
    checked, info["files_unverified"] the files this rank then opened that no rank had checked (0
    unless the prediction is wrong).

    keep_engine: the engine is returned ready to train (info["engine"] = (engine, optimizer),
    info["record"] the stage record saved), its module weights equal to the fp32 master as a
    load of the saved checkpoint would leave them; else it is destroyed here."""
    from megagrow.growth.ops import operator_between, plan_growth
    from megagrow.parallel.engine import build_stage

    stage = plan.stages[k]
    old_model = src.model
    same_stage = check_source(plan, k, src)
    op = operator_between("identity" if same_stage else (spec or stage.grow or "identity"), old_model, stage.model,
                          symmetry_breaking=stage.growth.symmetry_breaking)
    gp = plan_growth(op, old_model, stage.model)
    reset = not same_stage and stage.growth.optimizer_state == "reset"  # stage.growth: the plan's ablation knobs
    checked, verified = verify_reads(plan, k, src, spec) if verify else (None, None)
    t = [time.perf_counter()]
    engine, optimizer = build_stage(plan, k, init=False)  # every weight is written below
    init_optimizer_state(engine, optimizer)
    t.append(time.perf_counter())
    info = fill_engine(engine, gp.tensors, src, plan.seed, progress, reset_optimizer=reset)
    t.append(time.perf_counter())
    src_rec = src.record
    if same_stage:  # a resume at a new layout: the stage goes on where it stopped, every field kept
        rec = src_rec.resharded(plan, k)
    else:  # a new stage: its step 0 continues the data stream; LR placement from the operator
        rec = src_rec.grown(plan, k, *lr_placement(op, src_rec.lr_offset + src_rec.step, stage))
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
    info.update(op=op.describe() if hasattr(op, "describe") else str(op), step=rec.step, sample_offset=rec.sample_offset,
                bytes_read=src.bytes_read, files_opened=len(src.opened), tag=tag_of(rec.step),
                files_verified=len(checked or []),
                files_unverified=None if verified is None else len({os.path.basename(p) for p in src.opened[1:]} - set(verified)),
                phase_seconds={"engine": t[1] - t[0], "fill": t[2] - t[1], "save": t[3] - t[2]})
    return info


def _grown_record(plan: Plan, k: int, src: SourceCheckpoint, same_stage: bool, op):
    """The stage record a regrow into stage k writes (as `regrow` makes it)."""
    stage = plan.stages[k]
    if same_stage:  # a resume at a new layout: the stage goes on where it stopped, every field kept
        return src.record.resharded(plan, k)
    return src.record.grown(plan, k, *lr_placement(op, src.record.lr_offset + src.record.step, stage))


def regrow_offline(plan: Plan, k: int, src: SourceCheckpoint, out_dir: str, spec: str | None = None,
                   progress: bool = False, verify: bool = False) -> dict:
    """`regrow` without a DeepSpeed engine or a model: each rank of stage k's layout (global rank r:
    TP rank r % tp, DP rank r // tp, as megatron numbers them) writes its own native DeepSpeed files
    with `writer.RankWriter` (the same values, keys and dtypes as `regrow`'s engine saves); rank 0
    also `latest` and the recovery scripts. Reads exactly what `regrow` reads (`read_plan`). Needs
    only torch.distributed (gloo) when there are several ranks: at ZeRO-1/2 with dp > 1 the DP ranks
    of each TP rank gather the module weights to their DP rank 0, as DeepSpeed does; ZeRO-1/2/3
    layouts (`writer.supported`). verify and the returned info as `regrow`."""
    from megagrow.growth.ops import operator_between, plan_growth
    from megagrow.parallel.engine import ds_config
    from megagrow.state.writer import RankWriter, write_shared

    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if dist else 0
    stage = plan.stages[k]
    same_stage = check_source(plan, k, src)
    op = operator_between("identity" if same_stage else (spec or stage.grow or "identity"), src.model, stage.model,
                          symmetry_breaking=stage.growth.symmetry_breaking)
    reset = not same_stage and stage.growth.optimizer_state == "reset"
    checked, verified = verify_reads(plan, k, src, spec) if verify else (None, None)
    rec = _grown_record(plan, k, src, same_stage, op)
    tag = tag_of(rec.step)
    tag_dir = os.path.join(out_dir, tag)
    os.makedirs(tag_dir, exist_ok=True)
    L = stage.layout
    dp_groups = [None] * L.tp
    if dist and L.dp > 1 and L.zero_stage in (1, 2):  # DP rank 0 of each TP rank gathers the module weights
        dp_groups = [torch.distributed.new_group([t + L.tp * d for d in range(L.dp)]) for t in range(L.tp)]
    w = RankWriter(plan, k, plan_growth(op, src.model, stage.model).tensors, src, rank % L.tp, rank // L.tp, reset=reset,
                   dp_group=dp_groups[rank % L.tp])
    info = w.write(tag_dir, rec.step, rec.to_client_state(), ds_config(stage), progress,
                   adam_step=lambda: 0 if reset else src.adam_step())
    t0 = time.perf_counter()
    if dist:
        collectives.barrier()
    if rank == 0:
        write_shared(out_dir, tag)
    if dist:
        collectives.barrier()
    info["phase_seconds"] = {"fill": info.pop("fill_seconds"), "save": info.pop("save_seconds") + time.perf_counter() - t0}
    info.update(op=op.describe() if hasattr(op, "describe") else str(op), step=rec.step, sample_offset=rec.sample_offset,
                bytes_read=src.bytes_read, files_opened=len(src.opened), tag=tag, record=rec,
                files_verified=len(checked or []),
                files_unverified=None if verified is None else len({os.path.basename(p) for p in src.opened[1:]} - set(verified)))
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


def _read_setup(plan: Plan, k: int, src: SourceCheckpoint, spec: str | None):
    """(operator, growth tensors, states read, target layout's planned map) of a regrow into stage k."""
    from megagrow.growth.ops import operator_between, plan_growth

    stage = plan.stages[k]
    same = check_source(plan, k, src)
    op = operator_between("identity" if same else (spec or stage.grow or "identity"), src.model, stage.model,
                          symmetry_breaking=stage.growth.symmetry_breaking)
    tensors = plan_growth(op, src.model, stage.model).tensors
    states = ("w",) if (not same and stage.growth.optimizer_state == "reset") else ("w", "m", "v")
    L = stage.layout
    return op, tensors, states, SourceCheckpoint.planned(stage.model, L.tp, L.dp, L.zero_stage)


def _rank_reads(tensors: dict, states: tuple, target: SourceCheckpoint, src: SourceCheckpoint, frags: list, tp: int,
                tp_rank: int) -> tuple[set, int, int]:
    """(source optimizer files opened, bytes read, state bytes filled) of the target rank holding
    `frags` at TP rank `tp_rank`: fill_engine's box arithmetic on metadata alone (the offline writer,
    `regrow_offline`, reads the same boxes)."""
    from megagrow.growth.maps import Copy, box_size

    files, nbytes, state = set(), 0, 0
    for name, start, numel in frags:
        box, _ = fragment_box(name, target.local_shapes[name], start, numel, tp, tp_rank)
        for p in tensors[name].restrict(box):  # as apply_pieces: a copy with factor 0 reads nothing
            n = sum(isinstance(p, Copy) and p.factor(st) != 0.0 for st in states)
            if n:
                files |= src.files_for(p.src, p.src_box)
                nbytes += box_size(p.src_box) * 4 * n
        state += numel * 4 * 3
    return files, nbytes, state


def rank_source_files(plan: Plan, k: int, src: SourceCheckpoint, rank: int, spec: str | None = None) -> list[str]:
    """The source optimizer files (paths) that global rank `rank` of stage k's layout opens in a
    regrow from `src` (TP ranks consecutive, as megatron numbers them): read_plan's arithmetic
    for that one rank."""
    _, tensors, states, target = _read_setup(plan, k, src, spec)
    tp = plan.stages[k].layout.tp
    d, t = divmod(rank, tp)
    frags = [f for f in target.map.rank_fragments(d) if f[2] > 0]
    files, _, _ = _rank_reads(tensors, states, target, src, frags, tp, t)
    return sorted(src.path("optim", ft, fd) for ft, fd in files)


def assign_verifiers(opened: list, sizes: dict) -> dict:
    """Which rank checks each source file: `opened[r]` is the collection of file names rank r opens,
    `sizes` their bytes. Every file opened by some rank is checked once, by one of the ranks that
    open it (never a rank that would not touch it otherwise), the biggest files first, each to the
    opener with the fewest bytes to check so far (ties: the lowest rank). The same on every rank for
    the same input. Returns {name: rank}."""
    openers: dict = {}
    for r, names in enumerate(opened):
        for n in names:
            openers.setdefault(n, []).append(r)
    load = [0] * len(opened)
    out = {}
    for n in sorted(openers, key=lambda x: (-sizes.get(x, 0), x)):
        r = min(openers[n], key=lambda q: (load[q], q))
        out[n] = r
        load[r] += sizes.get(n, 0)
    return out


def verify_reads(plan: Plan, k: int, src: SourceCheckpoint, spec: str | None = None) -> tuple[list[str], list[str]]:
    """Before a regrow into stage k reads `src` (collective over the target layout's ranks): the CRC-32
    of every source optimizer file some rank will open is checked against the source's manifest once,
    by one of the ranks that open it (`assign_verifiers`: the ranks exchange the names of the files
    they open, a few names each); rank 0 also checks the metadata file every rank opens (the growth
    reads only its few metadata entries, so one rank checking it is enough). A rank stats only the
    files it checks (rank 0 sized every file of the tag when it chose it): metadata operations per
    rank stay O(its files), not O(the source's files). A mismatch is one UserError on every rank. A
    source without a manifest (unsealed: an old checkpoint, or one from elsewhere) is read as it is
    (SourceCheckpoint checks its structure). Returns (the names this rank checked, the names of the
    files it opens that some rank checked)."""
    from megagrow.state.manifest import MANIFEST, problems, read_manifest

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    tag_dir = os.path.join(src.dir, src.tag)
    mine, covered, bad = [], [], []
    if os.path.exists(os.path.join(tag_dir, MANIFEST)):
        opens = [os.path.basename(p) for p in rank_source_files(plan, k, src, rank, spec)]
        every = collectives.all_gather_object(opens) if torch.distributed.is_initialized() else [opens]
        files = (read_manifest(tag_dir) or {}).get("files", {})
        owner = assign_verifiers(every, {n: f.get("size", 0) for n, f in files.items()})
        mine = [n for n in opens if owner.get(n) == rank]
        covered = list(opens)
        if rank == 0 and src.opened:
            meta = os.path.basename(src.opened[0])
            mine.insert(0, meta)
            covered.insert(0, meta)
        bad = problems(tag_dir, deep=True, names=mine, only=True)
    if torch.distributed.is_initialized():
        bad = sorted({p for part in collectives.all_gather_object(bad) for p in part})
    if bad:
        raise UserError(f"source checkpoint {tag_dir} failed verification: {bad[0]}"
                        + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""), all_ranks=True)
    return mine, covered


def read_plan(plan: Plan, k: int, src: SourceCheckpoint, spec: str | None = None) -> dict:
    """What `regrow(plan, k, src, ...)` costs each rank of stage k's layout, from metadata alone:
    the same box arithmetic as `fill_engine` with no tensors and no processes. `src` may be a
    real checkpoint (its own shard map) or `SourceCheckpoint.planned(...)` (a layout that was
    never written: any scale). Per target rank (rank order: TP fastest, as megatron numbers them):
    the source files it opens (its metadata file + the optimizer files its boxes touch), the
    bytes it reads (fp32 elements of the source boxes, per state read) and the optimizer-state
    bytes it fills (fp32 weight + 2 moments of its own fragments); assumes DeepSpeed partitions
    stage k as `ShardMap` does (every opened source file is checked against that rule).
    Verification (`verify_reads`, reliability.verify_on_resume): `verify_bytes_per_rank` the bytes
    whose CRC-32 each rank computes (whole optimizer files, each once, by a rank that opens it; on
    rank 0 also the metadata file), `verify_files_per_rank` how many files that is (each also one
    stat: the only metadata operations a rank's check makes). Sizes from the source's manifest, or for a planned source what
    DeepSpeed writes (`SourceCheckpoint.file_bytes`). Linear in ranks at every ZeRO stage."""
    op, tensors, states, target = _read_setup(plan, k, src, spec)
    L = plan.stages[k].layout
    opened, read, filled, opens = [], [], [], []
    optim = {}
    for d in range(L.dp):
        frags = [f for f in target.map.rank_fragments(d) if f[2] > 0]
        for t in range(L.tp):
            files, nbytes, state = _rank_reads(tensors, states, target, src, frags, L.tp, t)
            for key in files - optim.keys():
                optim[key] = src.file_bytes("optim", *key)
            opened.append(1 + len(files))
            read.append(nbytes)
            filled.append(state)
            opens.append(files)
    name = {key: os.path.basename(src.path("optim", *key)) for key in optim}
    size = {name[key]: b for key, b in optim.items()}
    owner = assign_verifiers([[name[key] for key in files] for files in opens], size)  # as verify_reads does
    vbytes, vfiles = [0] * len(opens), [0] * len(opens)
    for n, r in owner.items():
        vbytes[r] += size[n]
        vfiles[r] += 1
    vbytes[0] += src.file_bytes("model", 0, 0)  # the metadata file every rank opens: rank 0 checks it
    vfiles[0] += 1
    return {"op": op.describe() if hasattr(op, "describe") else str(op), "layout": L.to_dict(),
            "source_layout": {"tp": src.tp, "dp": src.dp, "zero_stage": src.zero_stage},
            "source_files": src.tp * src.dp, "files_opened_per_rank": opened,
            "bytes_read_per_rank": read, "state_bytes_per_rank": filled,
            "verify_bytes_per_rank": vbytes, "verify_files_per_rank": vfiles}


# --------------------------------------------------------------------------------------
# resume: stage k from its own checkpoint at the same layout, through the shard reader


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
            raise UserError(f"{src.dir}/{src.tag}: parameter {name} has TP-local shape {src.local_shapes.get(name)}, "
                            f"this stage builds {tuple(shape)}; refusing to resume")
    step = None
    for state in ("w", "m", "v"):
        for name, _, start, numel, setter in frags:
            setter(state, _own_fragment(src, tp_rank, name, state, start, numel))
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


def _own_fragment(src: SourceCheckpoint, tp_rank: int, name: str, state: str, start: int, numel: int) -> torch.Tensor:
    """Flat elements [start, start+numel) of TP-local param `name`: at the source's own layout one
    fragment of one file holds them all, and the memory-mapped slice itself is returned (the setter
    copies it into the engine: no temporary copy); else `read_flat` assembles them."""
    frags = src.map.overlapping(name, start, start + numel)
    f = frags[0] if len(frags) == 1 else None
    if f is None or f.param_offset > start or f.param_offset + f.numel < start + numel:
        return src.read_flat(tp_rank, name, state, start, start + numel)
    flat = src._flat(tp_rank, f.dp_rank, f.group, state)
    a = f.flat_start + start - f.param_offset
    src.bytes_read += numel * flat.element_size()
    return flat[a:a + numel]


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
    the CRC-32 of its record entries recorded at seal time (`manifest.record_problems`; a manifest
    without one: the whole file).
    Files no rank opens (the other TP ranks' module files) are only sized (when rank 0 chose the tag).
    A mismatch is one UserError on every rank (manifest.verification_failed). Returns the names this
    rank checked."""
    from megagrow.state import manifest as mf

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
            whole = src.zero_stage == 3
            bad += mf.problems(tag_dir, deep=True, names=[meta], only=True) if whole else mf.record_problems(tag_dir, meta)
            mine.insert(0, meta)
    bad = sorted({p for part in collectives.all_gather_object(bad) for p in part})
    if bad:
        mf.verification_failed(src.dir, src.tag, bad, all_ranks=True)
    return mine


def resume_read_plan(model, tp: int, dp: int, zero_stage: int, dtype: str) -> dict:
    """Bytes each rank reads and checksums to resume a checkpoint of `model` at layout (tp, dp,
    zero_stage), from the shard map alone (any scale): the shard-reader resume (`resume_engine`) next to
    DeepSpeed's `engine.load_checkpoint`, per rank (TP fastest). Shard reader: its own fragments' fp32
    master and two moments (12 B/element of its partitions, memory-mapped), checksums of its own
    optimizer file (+ rank 0: the metadata file; at ZeRO-1/2 only the record inside the module file,
    counted 0 here). load_checkpoint at ZeRO-1/2: the whole TP-local module file (2 B/element bf16, 4
    fp32), not memory-mapped, plus the optimizer file; at ZeRO-3 its optimizer file and a small
    model-states file (0 here); and verify_distributed's checksum share (the files a rank wrote; TP rank
    t of DP rank 0 also the module file of TP rank t)."""
    src = SourceCheckpoint.planned(model, tp, dp, zero_stage)
    src.client = {"stage": {"layout": {"dtype": dtype}}}
    optim = src.file_bytes("optim", 0, 0)
    module = 0 if zero_stage == 3 else src.file_bytes("model", 0, 0)
    own = [12 * sum(n for _, _, n in src.map.rank_fragments(d)) for d in range(dp) for _ in range(tp)]
    verify = [optim for _ in range(tp * dp)]
    old_read = [optim + module for _ in range(tp * dp)]
    old_verify = [optim + (module if r < tp else 0) for r in range(tp * dp)]
    return {"layout": {"tp": tp, "dp": dp, "zero_stage": zero_stage, "dtype": dtype},
            "shard_reader": {"bytes_read_per_rank": own, "verify_bytes_per_rank": verify},
            "load_checkpoint": {"bytes_read_per_rank": old_read, "verify_bytes_per_rank": old_verify}}


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
