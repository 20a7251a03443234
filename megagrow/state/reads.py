"""What a regrow and a resume read, from metadata alone, and the checks before they read.

`read_plan` / `rank_source_files`: the source files and bytes each target rank of a regrow opens
(the executor's box arithmetic with no tensors); `verify_reads`: the checksums checked before a
regrow reads, each opened file once by a rank that opens it (`assign_verifiers`);
`resume_read_plan`: the same numbers for a resume at the checkpoint's own layout. Every function
takes the transition's `Growth` (decision.decide): the growth map is built once per transition.
"""

from __future__ import annotations

import os

import torch

from megagrow import collectives
from megagrow.config import Plan
from megagrow.errors import UserError
from megagrow.state.checkpoint import SourceCheckpoint
from megagrow.state.decision import Growth
from megagrow.state.executor import fragment_box


def target_map(plan: Plan, k: int) -> SourceCheckpoint:
    """Stage k's layout as a planned checkpoint: its shard map says which fragments each rank fills."""
    stage = plan.stages[k]
    L = stage.layout
    return SourceCheckpoint.planned(stage.model, L.tp, L.dp, L.zero_stage)


def _rank_reads(
    tensors: dict, states: tuple, target: SourceCheckpoint, src: SourceCheckpoint, frags: list, tp: int, tp_rank: int
) -> tuple[set, int, int]:
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


def rank_source_files(plan: Plan, k: int, src: SourceCheckpoint, rank: int, growth: Growth) -> list[str]:
    """The source optimizer files (paths) that global rank `rank` of stage k's layout opens in a
    regrow from `src` by `growth` (TP ranks consecutive, as megatron numbers them): read_plan's
    arithmetic for that one rank."""
    target = target_map(plan, k)
    tp = plan.stages[k].layout.tp
    d, t = divmod(rank, tp)
    frags = [f for f in target.map.rank_fragments(d) if f[2] > 0]
    files, _, _ = _rank_reads(growth.tensors, growth.states, target, src, frags, tp, t)
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


def verify_reads(plan: Plan, k: int, src: SourceCheckpoint, growth: Growth) -> tuple[list[str], list[str]]:
    """Before a regrow into stage k (by `growth`, the decision `regrow` took) reads `src` (collective
    over the target layout's ranks): the CRC-32 of every source optimizer file some rank will open is
    checked against the source's manifest once, by one of the ranks that open it (`assign_verifiers`:
    the ranks exchange the names of the files they open, a few names each); rank 0 also checks the
    metadata file every rank opens (the growth reads only its few metadata entries, so one rank
    checking them is enough: `metadata_problems`). A rank stats only the files it checks (rank 0 sized every file of the tag
    when it chose it): metadata operations per rank stay O(its files), not O(the source's files). A
    mismatch is one UserError on every rank. A source without a manifest (unsealed: an old
    checkpoint, or one from elsewhere) is read as it is (SourceCheckpoint checks its structure).
    Returns (the names this rank checked, the names of the files it opens that some rank checked)."""
    from megagrow.state.manifest import MANIFEST, problems, read_manifest

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    tag_dir = os.path.join(src.dir, src.tag)
    mine, covered, bad = [], [], []
    if os.path.exists(os.path.join(tag_dir, MANIFEST)):
        opens = [os.path.basename(p) for p in rank_source_files(plan, k, src, rank, growth)]
        every = collectives.all_gather_object(opens) if torch.distributed.is_initialized() else [opens]
        files = (read_manifest(tag_dir) or {}).get("files", {})
        owner = assign_verifiers(every, {n: f.get("size", 0) for n, f in files.items()})
        mine = [n for n in opens if owner.get(n) == rank]
        covered = list(opens)
        bad = problems(tag_dir, deep=True, names=mine, only=True)
        if rank == 0 and src.opened:
            meta = os.path.basename(src.opened[0])
            bad += metadata_problems(src, tag_dir, meta)
            mine.insert(0, meta)
            covered.insert(0, meta)
    if torch.distributed.is_initialized():
        bad = sorted({p for part in collectives.all_gather_object(bad) for p in part})
    if bad:
        raise UserError(
            f"source checkpoint {tag_dir} failed verification: {bad[0]}" + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""),
            all_ranks=True,
        )
    return mine, covered


def metadata_problems(src: SourceCheckpoint, tag_dir: str, name: str) -> list[str]:
    """Problems of the metadata file `name` every rank of a regrow or resume opens, checked as far as
    it is read. At ZeRO-1/2 it is the TP-rank-0 module file (8.7 GB at 70B), of which a reader uses
    only the pickled record and shapes, never the weights (they come from the fp32 master in the
    optimizer files): its size and the CRC-32 of its record entries recorded at seal time
    (`verify.record_problems`; a manifest without one: the whole file). Otherwise (a ZeRO-3
    model-states file, small) the whole file."""
    from megagrow.state.manifest import problems
    from megagrow.state.verify import record_problems

    if src.zero_stage in (1, 2):
        return record_problems(tag_dir, name)
    return problems(tag_dir, deep=True, names=[name], only=True)


def read_plan(plan: Plan, k: int, src: SourceCheckpoint, growth: Growth) -> dict:
    """What `regrow(plan, k, src, ..., growth=growth)` costs each rank of stage k's layout, from metadata alone:
    the same box arithmetic as `fill_engine` with no tensors and no processes. `src` may be a
    real checkpoint (its own shard map) or `SourceCheckpoint.planned(...)` (a layout that was
    never written: any scale). Per target rank (rank order: TP fastest, as megatron numbers them):
    the source files it opens (its metadata file + the optimizer files its boxes touch), the
    bytes it reads (fp32 elements of the source boxes, per state read) and the optimizer-state
    bytes it fills (fp32 weight + 2 moments of its own fragments); assumes DeepSpeed partitions
    stage k as `ShardMap` does (every opened source file is checked against that rule).
    Verification (`verify_reads`, reliability.verify_on_resume): `verify_bytes_per_rank` the bytes
    whose CRC-32 each rank computes (whole optimizer files, each once, by a rank that opens it; on
    rank 0 also what is read of the metadata file: `metadata_problems`), `verify_files_per_rank` how many files that is (each also one
    stat: the only metadata operations a rank's check makes). Sizes from the source's manifest, or for a planned source what
    DeepSpeed writes (`SourceCheckpoint.file_bytes`). Linear in ranks at every ZeRO stage."""
    target = target_map(plan, k)
    L = plan.stages[k].layout
    opened, read, filled, opens = [], [], [], []
    optim = {}
    for d in range(L.dp):
        frags = [f for f in target.map.rank_fragments(d) if f[2] > 0]
        for t in range(L.tp):
            files, nbytes, state = _rank_reads(growth.tensors, growth.states, target, src, frags, L.tp, t)
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
    # the metadata file every rank opens: rank 0 checks what is read of it (metadata_problems): at
    # ZeRO-1/2 its record entries (a few kB, counted 0 here), else the whole (small) file
    vbytes[0] += 0 if src.zero_stage in (1, 2) else src.file_bytes("model", 0, 0)
    vfiles[0] += 1
    return {
        "op": growth.describe(),
        "layout": L.to_dict(),
        "source_layout": {"tp": src.tp, "dp": src.dp, "zero_stage": src.zero_stage},
        "source_files": src.tp * src.dp,
        "files_opened_per_rank": opened,
        "bytes_read_per_rank": read,
        "state_bytes_per_rank": filled,
        "verify_bytes_per_rank": vbytes,
        "verify_files_per_rank": vfiles,
    }


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
    return {
        "layout": {"tp": tp, "dp": dp, "zero_stage": zero_stage, "dtype": dtype},
        "shard_reader": {"bytes_read_per_rank": own, "verify_bytes_per_rank": verify},
        "load_checkpoint": {"bytes_read_per_rank": old_read, "verify_bytes_per_rank": old_verify},
    }
