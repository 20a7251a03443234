"""Checking a sealed checkpoint against its manifest: before a resume reads it (`verify_distributed`,
`record_problems`, `verification_failed`) and `megagrow verify CKPT` (`verify_paths`, `verify_main`,
`checkpoint_dir_problem`). Sealing and choosing the checkpoint are megagrow/state/manifest.py.
"""

from __future__ import annotations

import json
import os
import re
import time
import zlib

from megagrow.errors import UserError
from megagrow.paths import LATEST, StagePaths
from megagrow.state.manifest import (
    _MP,
    _ZERO,
    MANIFEST,
    _coll,
    _rank_world,
    complete_tags,
    manifest_of,
    owner_rank,
    problems,
    read_latest,
    read_manifest,
    tag_files,
    tags,
)


def verify_distributed(ckpt_dir: str, tag: str, tp: int = 1) -> None:
    """Before loading `tag`: each rank checks the checksums of its own share of the files; any
    mismatch is a UserError on every rank naming the file and the next older complete tag."""
    coll = _coll()
    rank, world = _rank_world(coll)
    tag_dir = os.path.join(ckpt_dir, tag)
    m = read_manifest(tag_dir) or {"files": {}}
    mine = [n for n in m["files"] if owner_rank(n, tp, world) == rank]
    # rank 0 chose the tag (sizes of every file: `choose`); each rank now stats and checksums its own share
    bad = problems(tag_dir, deep=True, names=mine, only=True) if mine else []
    if coll:
        bad = sorted({p for part in coll.all_gather_object(bad) for p in part})
    if bad:
        verification_failed(ckpt_dir, tag, bad, all_ranks=coll is not None)


def verification_failed(ckpt_dir: str, tag: str, bad: list, all_ranks: bool) -> None:
    """Raise the UserError of a resume whose checkpoint failed verification: the first problem, how many
    more, and the next older complete checkpoint."""
    tag_dir = os.path.join(ckpt_dir, tag)
    older = [t for t in complete_tags(ckpt_dir) if t != tag and _step(ckpt_dir, t) < _step(ckpt_dir, tag)]
    offer = (
        (
            f"the next older complete checkpoint is {older[0]}: to resume from it, move {tag_dir} aside "
            f"(`megagrow verify {ckpt_dir}` lists every tag)"
        )
        if older
        else "no older complete checkpoint exists"
    )
    raise UserError(
        f"checkpoint {tag_dir} failed verification: {bad[0]}" + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "") + f"; {offer}",
        all_ranks=all_ranks,
    )


_STORAGE = re.compile(r"/data/\d+$")  # a tensor storage inside a torch.save zip archive


def record_crc(path: str) -> str:
    """CRC-32 (8 hex digits) of the entries of a torch.save zip archive that are not tensor storages (the
    pickled record, its version and byte-order entries), names included, read raw from the file: what a
    reader of the record alone reads. The archive's own per-entry CRCs are not used (torch.save may
    leave them 0: torch.serialization.set_crc32_options). A file that is not such an archive: ValueError."""
    import struct
    import zipfile

    crc = 0
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            for info in sorted(z.infolist(), key=lambda i: i.filename):
                if _STORAGE.search(info.filename):
                    continue
                f.seek(info.header_offset)
                head = f.read(30)
                if len(head) < 30 or head[:4] != b"PK\x03\x04":
                    raise ValueError(f"bad local header of {info.filename}")
                n, extra = struct.unpack("<HH", head[26:30])
                f.seek(info.header_offset + 30 + n + extra)
                data = f.read(info.compress_size)
                if len(data) != info.compress_size:
                    raise ValueError(f"{info.filename} cut short")
                crc = zlib.crc32(data, zlib.crc32(info.filename.encode(), crc))
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return f"{crc & 0xFFFFFFFF:08x}"


def record_problems(tag_dir: str, name: str) -> list[str]:
    """What is wrong with the parts of file `name` that a reader of its record alone reads, not its
    tensors: its size against the manifest, and `record_crc` against the manifest's `record_crc32`. A
    resume reads only the record of the ZeRO-1/2 module file; checking it whole would read every weight.
    A manifest without `record_crc32` (sealed before it was recorded): the whole file's CRC-32."""
    m = read_manifest(tag_dir) or {"files": {}}
    want = m["files"].get(name)
    if not isinstance(want, dict) or "record_crc32" not in want:
        return problems(tag_dir, deep=True, names=[name], only=True)
    out = problems(tag_dir, deep=False, names=[name], only=True)
    if out:
        return out
    try:
        got = record_crc(os.path.join(tag_dir, name))
    except ValueError as e:
        return [f"{name}: record unreadable ({e})"]
    if got != want["record_crc32"]:
        return [f"{name}: record checksum {got} != {want['record_crc32']} recorded (corrupted)"]
    return []


def _step(ckpt_dir: str, tag: str) -> int:
    m = manifest_of(ckpt_dir, tag) or {}
    return m.get("step", -1) if isinstance(m.get("step"), int) else -1


def verify_paths(path: str) -> list[dict]:
    """One report per tag of `path` (a tag directory, or a checkpoint directory holding tags)."""
    if not os.path.isdir(path):
        raise UserError(f"checkpoint not found: {path}")
    if os.path.exists(os.path.join(path, MANIFEST)) or tag_files(path) and not tags(path):
        tag_dirs = [path]
    else:
        tag_dirs = [os.path.join(path, t) for t in tags(path)]
        if not tag_dirs:
            raise UserError(f"{path}: no checkpoint tags in it")
    latest = read_latest(path)
    out = []
    for d in tag_dirs:
        m = read_manifest(d) or {}
        t0 = time.perf_counter()
        p = problems(d, deep=True)
        out.append(
            {
                "tag": os.path.basename(os.path.normpath(d)),
                "path": d,
                "complete": not p,
                "problems": p,
                "step": m.get("step"),
                "stage": m.get("stage"),
                "files": len(m.get("files", {})),
                "bytes": sum(f.get("size", 0) for f in m.get("files", {}).values()),
                "latest": os.path.basename(d) == latest,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
    return out


def verify_main(args) -> int:
    reports = verify_paths(args.ckpt)
    if args.json:
        print(json.dumps({"ok": all(r["complete"] for r in reports), "tags": reports}, indent=1))
    else:
        for r in reports:
            mark = "ok" if r["complete"] else "BAD"
            extra = f"{r['files']} files, {r['bytes'] / 1e6:.1f} MB, step {r['step']}" if r["complete"] else "; ".join(r["problems"][:3])
            print(f"{mark:3s} {r['tag']}{' (latest)' if r['latest'] else ''}: {extra}")
    return 0 if all(r["complete"] for r in reports) else 1


def _has_tag_content(d: str) -> bool:
    """`d` holds a manifest or DeepSpeed's files of a tag (model or ZeRO optimizer states)."""
    try:
        names = os.listdir(d)
    except OSError:
        return False
    return any(n == MANIFEST or _MP.match(n) or _ZERO.match(n) for n in names)


def checkpoint_dir_problem(path: str) -> str | None:
    """Why `path` is neither a checkpoint tag nor a checkpoint directory (`megagrow verify`'s input),
    or None when it is one: a tag has a manifest or DeepSpeed's files; a checkpoint directory has
    `latest`, or a sub-directory that is a tag or named like one (step_N: a save that never finished)."""
    from megagrow.paths import TAG_PREFIX

    if not os.path.isdir(path) or _has_tag_content(path) or os.path.isfile(os.path.join(path, LATEST)):
        return None  # verify_paths says "checkpoint not found" for a path that is not a directory
    subs = [n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n))]
    if any(n.startswith(TAG_PREFIX) or _has_tag_content(os.path.join(path, n)) for n in subs):
        return None
    hint = ""
    if os.path.isdir(StagePaths(path).ckpt):
        hint = f" (a stage directory: verify {os.path.join(path, 'checkpoints')})"
    elif any(os.path.isdir(StagePaths(os.path.join(path, n)).ckpt) for n in subs):
        hint = f" (a run directory: verify {os.path.join(path, '<stage>', 'checkpoints')})"
    return f"not a checkpoint directory: {path} (no {MANIFEST}, DeepSpeed files, `{LATEST}` or {TAG_PREFIX}N tags in it){hint}"
