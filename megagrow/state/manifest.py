"""A checkpoint counts only when it is complete: every rank's files written, sized and checksummed.

DeepSpeed writes a checkpoint tag as many files, one or more per rank, and (by default) its
`latest` pointer from rank 0 while other ranks may still be writing. A job killed in that
window leaves `latest` naming a torn checkpoint. Here a save is sealed instead:

  1. `engine.save_checkpoint(..., save_latest=False)`: DeepSpeed writes its native files and
     ends with a barrier (every rank's files are on disk, or a rank failed);
  2. each rank checksums (CRC-32, streamed) and fsyncs the files it owns (its own
     `zero_pp_rank_D_mp_rank_TT_*` files, TP rank t's `mp_rank_TT_model_states.pt` goes to
     (t, dp 0), anything else to rank 0); rank 0 gathers them;
  3. rank 0 writes TAG/megagrow_manifest.json last (temp file, fsync, rename, fsync of the
     directory) with the plan, stage, step, data position, layout and every file with its size
     and checksum;
  4. only then rank 0 moves `latest` (temp + rename) to the tag, and prunes old tags (keep_last).

Resume (`choose`) takes the newest tag whose manifest is present and whose files have the
recorded sizes, names the incomplete ones it skipped, then each rank verifies the checksums of
what it will read of that tag (`resume.verify_resume`; `verify.verify_distributed` for zero_stage 0);
a mismatch is an error naming the file and the next older complete checkpoint. `megagrow verify CKPT`
checks a tag or a whole checkpoint directory (megagrow/state/verify.py).

Cost: CRC-32 (zlib) streams at about 1.7 GB/s per core from the page cache on the development
machine (blake2b 0.8 GB/s, sha256 1.2 GB/s), split over the ranks, so a seal adds well under a
second per GB a rank writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import zlib

from megagrow import faults
from megagrow.errors import SaveFailed, UserError, _rank
from megagrow.fsutil import fsync_dir, write_file_atomic
from megagrow.paths import LATEST  # DeepSpeed's pointer file name; written here, atomically, after the manifest

MANIFEST = "megagrow_manifest.json"
FORMAT = 1
_CHUNK = 1 << 22
_TMP = re.compile(r"\.tmp\d+$")


# --------------------------------------------------------------------------------------
# files and owners


def checksum(path: str, sync: bool = False) -> tuple[int, str]:
    """(size in bytes, CRC-32 as 8 hex digits) of a file, streamed; `sync` also fsyncs it."""
    crc, size = 0, 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            size += n
        if sync:
            os.fsync(f.fileno())
    return size, f"{crc & 0xFFFFFFFF:08x}"


def tag_files(tag_dir: str) -> list[str]:
    """The data files of a tag (everything but our manifest and temp files), sorted."""
    try:
        names = os.listdir(tag_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n != MANIFEST and not _TMP.search(n) and os.path.isfile(os.path.join(tag_dir, n)))


_ZERO = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_")
_MP = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def owner_rank(name: str, tp: int, world: int) -> int:
    """The global rank that checksums file `name`: the rank that wrote it (TP ranks are consecutive:
    global = dp_rank * tp + tp_rank); files of no rank (or of a rank outside the world) go to rank 0."""
    m = _ZERO.search(name)
    if m:
        r = int(m.group(1)) * tp + int(m.group(2))
    else:
        m = _MP.match(name)
        r = int(m.group(1)) if m else 0
    return r if 0 <= r < world else 0


# --------------------------------------------------------------------------------------
# atomic small files


def write_latest(ckpt_dir: str, tag: str) -> None:
    write_file_atomic(os.path.join(ckpt_dir, LATEST), tag, durable=True)


def read_latest(ckpt_dir: str) -> str | None:
    try:
        with open(os.path.join(ckpt_dir, LATEST)) as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


# --------------------------------------------------------------------------------------
# reading and checking


def read_manifest(tag_dir: str) -> dict | None:
    """The manifest of a tag, or None if it is missing or not a manifest of ours."""
    try:
        with open(os.path.join(tag_dir, MANIFEST)) as f:
            m = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("files"), dict):
        return None
    return m


def problems(tag_dir: str, deep: bool = True, names: list[str] | None = None, only: bool = False) -> list[str]:
    """What is wrong with a tag: [] when it is complete. Sizes always; checksums when `deep`
    (only of `names` if given: a rank checks its own share). only: look at `names` alone, sizes
    too (one stat each, no directory listing): a rank's share once rank 0 has sized the whole tag."""
    m = read_manifest(tag_dir)
    if m is None:
        why = "manifest unreadable" if os.path.exists(os.path.join(tag_dir, MANIFEST)) else "no manifest (save not finished)"
        return [why]
    if m.get("tag") != os.path.basename(os.path.normpath(tag_dir)):
        return [f"manifest names tag {m.get('tag')!r}"]
    out = []
    files = m["files"]
    if only:
        for name in sorted(set(names or ())):
            want = files.get(name)
            path = os.path.join(tag_dir, name)
            try:
                size = os.stat(path).st_size
            except OSError:
                out.append(f"{name}: missing" if want else f"{name}: not in the manifest")
                continue
            if want is None:
                out.append(f"{name}: not in the manifest")
            elif size != want.get("size"):
                out.append(f"{name}: size {size} != {want.get('size')} recorded")
            elif deep:
                got = checksum(path)[1]
                if got != want.get("crc32"):
                    out.append(f"{name}: checksum {got} != {want.get('crc32')} recorded (corrupted)")
        return out
    present = set(tag_files(tag_dir))
    for name in sorted(set(files) - present):
        out.append(f"{name}: missing")
    for name in sorted(present - set(files)):
        out.append(f"{name}: not in the manifest")
    for name in sorted(set(files) & present):
        want = files[name]
        path = os.path.join(tag_dir, name)
        size = os.path.getsize(path)
        if size != want.get("size"):
            out.append(f"{name}: size {size} != {want.get('size')} recorded")
        elif deep and (names is None or name in names):
            got = checksum(path)[1]
            if got != want.get("crc32"):
                out.append(f"{name}: checksum {got} != {want.get('crc32')} recorded (corrupted)")
    return out


def tags(ckpt_dir: str) -> list[str]:
    """Tag directories in a checkpoint directory, newest first (by the step in the manifest or
    the tag name's number, then name)."""
    try:
        names = [n for n in os.listdir(ckpt_dir) if os.path.isdir(os.path.join(ckpt_dir, n))]
    except FileNotFoundError:
        return []

    def key(n):
        m = read_manifest(os.path.join(ckpt_dir, n))
        if m is not None and isinstance(m.get("step"), int):
            return (m["step"], n)
        digits = re.findall(r"\d+", n)
        return (int(digits[-1]) if digits else -1, n)

    return sorted(names, key=key, reverse=True)


def complete_tags(ckpt_dir: str) -> list[str]:
    """Tags whose manifest is present and whose files have the recorded sizes, newest first."""
    return [t for t in tags(ckpt_dir) if not problems(os.path.join(ckpt_dir, t), deep=False)]


def choose(ckpt_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(newest complete tag or None, [(newer tag skipped, why)]). Cheap: sizes, not checksums."""
    skipped = []
    for t in tags(ckpt_dir):
        p = problems(os.path.join(ckpt_dir, t), deep=False)
        if not p:
            return t, skipped
        skipped.append((t, p[0] if len(p) == 1 else f"{p[0]} (+{len(p) - 1} more)"))
    return None, skipped


def choose_once(ckpt_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """`choose` made by global rank 0 alone and broadcast (collective when torch.distributed runs):
    its listing, manifest reads and stats happen once per job, not once per rank (at 1,024 ranks
    and a few hundred files per tag, millions of metadata operations against one directory)."""
    coll = _coll()
    if coll is None:
        return choose(ckpt_dir)
    rank, _ = _rank_world(coll)
    res = choose(ckpt_dir) if rank == 0 else None
    return coll.broadcast_object(res, src=0)


def sealed_dir(ckpt_dir: str) -> bool:
    """Whether megagrow sealed checkpoints in `ckpt_dir`: some tag of it holds a manifest file. A
    directory without any (plain DeepSpeed, or an unsealed regrow output) has only `latest` to go by."""
    return any(os.path.exists(os.path.join(ckpt_dir, t, MANIFEST)) for t in tags(ckpt_dir))


def _older_offer(ckpt_dir: str, tag: str) -> str:
    order = tags(ckpt_dir)  # newest first, by the manifest's step or the tag name's number
    older = [t for t in order[order.index(tag) + 1 if tag in order else 0 :] if not problems(os.path.join(ckpt_dir, t), deep=False)]
    return f"the next older complete checkpoint is {older[0]} (--tag {older[0]})" if older else "no older complete checkpoint exists"


def current(ckpt_dir: str, tag: str | None = None, verify: bool = False, say=None) -> str:
    """The checkpoint a reader of `ckpt_dir` reads (export-hf, regrow, SourceCheckpoint.open): the tag
    asked for, else the newest complete one (`choose`: newest sealed, sizes as recorded), never a tag
    merely because `latest` names it. A skipped newer tag is said through `say` (one line each; default:
    a `note:` line on stderr, rank 0 alone). verify: also check the checksums of the tag's files.

    A UserError when the tag asked for, or every tag, is incomplete or corrupted, naming the file and
    the next older complete tag. A directory megagrow never sealed (no manifest in any tag) is read
    where `tag`, else `latest`, points, as it is."""
    if say is None:

        def say(line):
            if _rank() == 0:  # under torchrun or srun every rank decides alike: one note, not one per rank
                print(f"note: {line}", file=sys.stderr, flush=True)

    if not sealed_dir(ckpt_dir):
        tag = tag or read_latest(ckpt_dir)
        if tag is None:
            raise UserError(f"no DeepSpeed checkpoint in {ckpt_dir} (no 'latest' file); pass --tag")
        return tag
    if tag is None:
        tag, skipped = choose(ckpt_dir)
        latest = read_latest(ckpt_dir)
        if tag is None:
            why = "; ".join(f"{t}: {w}" for t, w in skipped[:3]) or "no tags"
            raise UserError(f"{ckpt_dir}: no complete checkpoint ({why}); `megagrow verify {ckpt_dir}` lists them")
        for t, why in skipped:
            say(
                f"skipping incomplete checkpoint {os.path.join(ckpt_dir, t)} ({why})"
                + (f"; `latest` names it, reading the older complete checkpoint {tag}" if t == latest else "")
            )
    tag_dir = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(tag_dir):
        have = complete_tags(ckpt_dir)
        raise UserError(f"tag {tag!r} not found in {ckpt_dir} (complete checkpoints: {', '.join(have) or 'none'})")
    bad = problems(tag_dir, deep=verify)
    if bad:
        raise UserError(
            f"checkpoint {tag_dir} "
            + ("failed verification" if os.path.exists(os.path.join(tag_dir, MANIFEST)) else "is incomplete")
            + f": {bad[0]}"
            + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
            + f"; {_older_offer(ckpt_dir, tag)}"
        )
    return tag


def manifest_of(ckpt_dir: str, tag: str) -> dict | None:
    return read_manifest(os.path.join(ckpt_dir, tag))


# --------------------------------------------------------------------------------------
# writing (collective: every rank of the job calls these)


def _coll():
    """megagrow.collectives once torch.distributed is running (None in a single process without it)."""
    import torch.distributed

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from megagrow import collectives

    return collectives


def _rank_world(coll) -> tuple[int, int]:
    import torch.distributed

    return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if coll else (0, 1)


def checkpoint_meta(plan, k: int, step: int, sample_index: int, **extra) -> dict:
    """What a manifest records about the checkpoint besides its files."""
    stage = plan.stages[k]
    return {
        "plan": plan.name,
        "stage": stage.name,
        "stage_index": k,
        "step": int(step),
        "sample_index": int(sample_index),
        "layout": stage.layout.to_dict(),
        "model": stage.model.to_dict(),
        **extra,
    }


def seal(ckpt_dir: str, tag: str, meta: dict, tp: int = 1, keep_last: int = 0) -> dict:
    """Checksum the files of `ckpt_dir/tag` (each rank its own), then on rank 0 write the manifest
    and move `latest` to the tag; prune to `keep_last` complete tags (0: keep all). Collective.
    A failure on rank 0 (disk full) raises the same SaveFailed on every rank, leaves no temp
    files and leaves `latest` at the previous complete tag."""
    coll = _coll()
    rank, world = _rank_world(coll)
    if coll:
        coll.barrier()
    tag_dir = os.path.join(ckpt_dir, tag)
    names = tag_files(tag_dir)
    t0 = time.perf_counter()
    mine = {n: _file_entry(tag_dir, n) for n in names if owner_rank(n, tp, world) == rank}
    t_sum = time.perf_counter() - t0
    faults.point("seal.checksummed", meta.get("step"))
    gathered = coll.gather_object(mine, dst=0) if coll else [mine]
    err = ""
    m = {}
    if rank == 0:
        try:
            files = {}
            for part in gathered:
                files.update(part)
            for n in names:  # a file the owner did not see (should not happen): rank 0 does it
                if n not in files:
                    files[n] = _file_entry(tag_dir, n)
            m = {
                "format": FORMAT,
                "kind": "megagrow-checkpoint",
                "tag": tag,
                **meta,
                "world_size": world,
                "checksum": "crc32",
                "written": round(time.time(), 3),
                "seal_seconds_rank0": round(t_sum, 4),
                "files": dict(sorted(files.items())),
            }
            fsync_dir(tag_dir)
            write_file_atomic(os.path.join(tag_dir, MANIFEST), json.dumps(m, indent=1, sort_keys=True), durable=True)
            faults.point("seal.manifest", meta.get("step"))
            write_latest(ckpt_dir, tag)
            if keep_last:
                prune(ckpt_dir, keep_last)
        except OSError as e:
            err = f"could not finish checkpoint {tag_dir} ({e.strerror or e}); " + _kept(ckpt_dir, tag)
    if coll:
        err = coll.broadcast_object(err, src=0)
    if err:
        raise SaveFailed(err, all_ranks=True)
    return m


def _kept(ckpt_dir: str, tag: str) -> str:
    prev = [t for t in complete_tags(ckpt_dir) if t != tag]
    return f"the previous complete checkpoint {prev[0]} is kept" if prev else "no earlier complete checkpoint exists"


def prepare(ckpt_dir: str, tag: str) -> None:
    """Before DeepSpeed writes into `tag` again (rank 0): drop its old manifest, so a save killed
    half way is never taken for the old, complete one."""
    try:
        os.unlink(os.path.join(ckpt_dir, tag, MANIFEST))
    except FileNotFoundError:
        pass


def prune(ckpt_dir: str, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` complete tags, and incomplete tags older than the
    newest complete one. Never the newest complete tag, never the one `latest` names."""
    keep_last = max(1, keep_last)
    complete = complete_tags(ckpt_dir)
    if not complete:
        return []
    keep = set(complete[:keep_last]) | {read_latest(ckpt_dir)}
    newest = complete[0]
    order = tags(ckpt_dir)
    older = order[order.index(newest) + 1 :]
    gone = [t for t in older if t not in keep]
    for t in gone:
        shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)
    return gone


def save(engine, ckpt_dir: str, tag: str, client_state: dict, meta: dict, tp: int = 1, keep_last: int = 0) -> dict:
    """DeepSpeed's save of `tag` (without its `latest`), then `seal`. Collective. A tag that is already
    complete is not written again (a save at the step just resumed from: the same state), only
    pointed at: a kill during such a save can then never tear the checkpoint it started from.
    A write that fails (disk full) on rank 0 raises SaveFailed on every rank, with `latest` left at
    the previous complete checkpoint; on another rank it raises there and the others see a lost rank."""
    coll = _coll()
    rank, _ = _rank_world(coll)
    tag_dir = os.path.join(ckpt_dir, tag)
    done = os.path.isdir(tag_dir) and not problems(tag_dir, deep=False)
    if coll:
        done = coll.broadcast_object(done, src=0)
    if done:
        if rank == 0:
            write_latest(ckpt_dir, tag)
        return read_manifest(tag_dir) or {}
    if rank == 0 and os.path.isdir(tag_dir):  # a torn earlier save of this step: start it clean
        prepare(ckpt_dir, tag)
        shutil.rmtree(tag_dir, ignore_errors=True)
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:
        why = _write_failure(e, ckpt_dir)
        if why is None:
            raise
        raise SaveFailed(f"could not write checkpoint {tag_dir} ({why}); " + _kept(ckpt_dir, tag)) from None
    return seal(ckpt_dir, tag, meta, tp=tp, keep_last=keep_last)


def _write_failure(e: BaseException, ckpt_dir: str) -> str | None:
    """Why a checkpoint write failed, in a few words, or None when `e` is not a write failure (a bug:
    re-raised as is). torch.save reports a full disk as a RuntimeError from its zip writer ("unexpected
    pos", "file write failed") rather than as an OSError."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)
    if not any(k in text for k in ("unexpected pos", "file write failed", "PytorchStreamWriter", "No space left")):
        return None
    try:
        free = shutil.disk_usage(ckpt_dir).free
    except OSError:
        free = None
    if "No space left" in text or free is not None and free < (1 << 20):
        return "No space left on device" + (f": {free} bytes free" if free is not None else "")
    return "write failed: " + text.splitlines()[0][:200]


def save_record(engine, ckpt_dir: str, rec, keep_last: int = 0) -> dict:
    """`save` of a stage's state: the tag, client state and manifest entries from its StageRecord."""
    from megagrow.paths import tag_of

    meta = checkpoint_meta(rec.plan, rec.index, rec.step, rec.sample_index, final_step=rec.final_step, finished=rec.finished)
    return save(engine, ckpt_dir, tag_of(rec.step), rec.to_client_state(), meta, tp=rec.stage.layout.tp, keep_last=keep_last)


def _file_entry(tag_dir: str, name: str) -> dict:
    """A manifest's entry for file `name`: size and CRC-32, for a ZeRO-1/2 module file also `record_crc32`
    (`verify.record_crc`: what a resume reads of it)."""
    from megagrow.state.verify import record_crc

    path = os.path.join(tag_dir, name)
    size, crc = checksum(path, sync=True)
    entry = {"size": size, "crc32": crc}
    if _MP.match(name):
        try:
            entry["record_crc32"] = record_crc(path)
        except ValueError:
            pass  # not a zip archive: the whole-file checksum stands alone
    return entry
