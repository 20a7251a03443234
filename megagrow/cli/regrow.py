"""tools/regrow.py: convert a checkpoint of stage k into stage k+1 (or reshard stage k) at the
target stage's layout, shard to shard.

    python tools/regrow.py --src RUN/s0/checkpoints [--tag T] --plan PLAN --to-stage K --out DIR [--json]
    torchrun --nproc_per_node=W tools/regrow.py ...      (or srun: the same, one process per rank)

Started directly, it validates every input first (one `error:` line, exit 2, nothing started),
then forks the W = tp x dp ranks of the target stage's layout from itself on this machine (they
inherit its imports and die with it). Under torchrun or srun, W must equal the target stage's
tp x dp (torchrun adds its own traceback to any failing worker; the direct start does not). Each
rank reads only the bytes of the source its own fragments need, and checks the CRC-32 of the source
files it opens (each file once, by one of the ranks that open it). The output is a native DeepSpeed
checkpoint, usable with engine.load_checkpoint at the target layout or as the stage's checkpoint
directory: each rank writes its own files directly, streamed, never whole in memory
(megagrow/state/writer.py, no engine or model is built; ZeRO-0 targets go through a DeepSpeed engine).
Refuses a non-empty --out; writes to a temporary name, seals it (a manifest of every file's size
and CRC-32, `megagrow verify` checks it) and renames it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

from megagrow import faults
from megagrow.errors import UserError, cli_entry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megagrow regrow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--src",
        help="source DeepSpeed checkpoint directory (holds 'latest' and tag folders); "
        "with --dry-run it may be left out: the source is then stage K-1 of the plan at its layout",
    )
    p.add_argument("--tag", help="source tag (default: the newest complete one)")
    p.add_argument("--plan", required=True, help="the stage plan YAML")
    p.add_argument("--to-stage", required=True, help="target stage index or name")
    p.add_argument("--out", help="output checkpoint directory (must not exist or be empty); not with --dry-run")
    p.add_argument("--grow", help="growth operator spec overriding the stage's `grow` field")
    p.add_argument("--json", action="store_true", help="print a JSON summary (rank 0)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override one plan value (repeatable), as `megagrow train --set` does"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="start no ranks, read no tensors: print what each target rank would open, read and fill "
        "(files_opened_per_rank, bytes_read_per_rank, state_bytes_per_rank), from the shard maps alone, at any scale",
    )
    return p


def _dry_run(args, plan, k: int) -> int:
    from megagrow.state.checkpoint import SourceCheckpoint
    from megagrow.state.decision import decide_for
    from megagrow.state.reads import read_plan
    from megagrow.state.record import StageRecord

    if args.out:
        raise UserError("--dry-run writes nothing: leave out --out")
    if args.src:
        src = SourceCheckpoint.open(args.src, args.tag)
    elif k == 0:
        raise UserError("--dry-run without --src plans growth from stage K-1: give a stage after the first, or --src")
    else:
        prev = plan.stages[k - 1]
        L = prev.layout
        src = SourceCheckpoint.planned(prev.model, L.tp, L.dp, L.zero_stage, record=StageRecord(plan, k - 1))
    res = read_plan(plan, k, src, decide_for(plan, k, src, args.grow))
    res["stage"] = plan.stages[k].name
    if args.json:
        print(json.dumps(res))
    else:
        o, b, s = res["files_opened_per_rank"], res["bytes_read_per_rank"], res["state_bytes_per_rank"]
        v = res["verify_bytes_per_rank"]
        print(
            f"regrow (dry run): -> {res['stage']} ({res['op']}) at {res['layout']}, from {res['source_layout']} "
            f"({res['source_files']} optimizer files)\n  per rank: files opened max {max(o)} mean {sum(o) / len(o):.1f}; "
            f"read max {max(b) / 1e9:.3f} GB mean {sum(b) / len(b) / 1e9:.3f} GB; state filled max {max(s) / 1e9:.3f} GB"
            f"\n  verification (CRC-32 of the files a rank opens): max {max(v) / 1e9:.3f} GB (rank {v.index(max(v))}), "
            f"mean {sum(v) / len(v) / 1e9:.3f} GB, {sum(v) / 1e9:.1f} GB in all"
        )
    return 0


@cli_entry
def main(argv=None) -> int:
    import signal

    # blocked when a launcher started this process through procs.spawn_ranks
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGUSR1, signal.SIGTERM))
    args = _parser().parse_args(argv)
    from megagrow.config import load_plan

    plan = load_plan(args.plan, args.set or ())
    k = plan.stages.index(plan.stage(args.to_stage))
    if args.dry_run:
        return _dry_run(args, plan, k)
    job = _validate(args, plan, k)
    if job.direct and plan.stages[k].layout.world_size > 1:
        return _spawn(args, plan, k, job)
    return _rank_part(args, plan, k, job)


def _rank_part(args, plan, k: int, job) -> int:
    """One rank's regrow (the only one when the target has one rank): its files, rank 0 the report."""
    info, rank, allr = _run(args, plan, k, job)
    if rank == 0:
        _report(args, plan.stages[k], job, info, allr)
    from megagrow.procs import exit_rank

    exit_rank(0)  # after a barrier; skips interpreter shutdown (~1.5 s)


@dataclass
class _Job:
    """A validated regrow: where it writes, its source and the growth decision, how it was started."""

    out: str
    src: object  # SourceCheckpoint
    tag: str
    growth: object  # decision.Growth
    direct: bool  # started directly (not under torchrun/srun): this process forks the ranks
    verify: bool  # each rank checks the checksums of the files it opens
    t0: float


def _validate(args, plan, k: int) -> _Job:
    """Every check that can fail before a rank starts (one UserError): the output, the source tag and
    checkpoint, and the growth decision (made once here, then passed to the regrow)."""
    if not args.src or not args.out:
        raise UserError("--src and --out are required (only --dry-run goes without them)")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"output {out} exists and is not an empty directory; refusing to overwrite")
    t0 = time.perf_counter()
    from megagrow.state.checkpoint import SourceCheckpoint
    from megagrow.state.decision import decide_for
    from megagrow.state.manifest import current

    direct = not any(k in os.environ for k in ("RANK", "SLURM_PROCID"))
    if not os.path.isdir(args.src):
        raise UserError(f"checkpoint directory not found: {args.src}")
    # the source tag: --tag, else the newest complete one (a torn tag is refused, naming the older complete
    # one; every file's size is checked against the tag's manifest)
    tag = current(args.src, args.tag)
    src = SourceCheckpoint.open(args.src, tag)  # reads the metadata (one file); validates it
    growth = decide_for(plan, k, src, args.grow)
    if direct:  # every optimizer file's structure is checked once, before any rank starts
        src.check_files()
        src.close()
    # each rank checks the checksums of exactly the source files it opens (regrow(verify=True)): under
    # torchrun or srun, and the ranks a direct start forks
    return _Job(out, src, tag, growth, direct, True, t0)


def _spawn(args, plan, k: int, job: _Job) -> int:
    """Started directly: everything was checked once, here; now the ranks of the target layout, forked
    from this process (the imports and the checks above are not done again), each with the source
    opened afresh (what it opens and reads is its own to count)."""
    import dataclasses

    from megagrow.procs import fork_ranks, wait_ranks
    from megagrow.state.checkpoint import SourceCheckpoint

    def rank():
        return cli_entry(_rank_part)(args, plan, k, dataclasses.replace(job, src=SourceCheckpoint.open(args.src, job.tag)))

    procs = fork_ranks(rank, plan.stages[k].layout.world_size)
    try:
        res = wait_ranks(procs, grace_s=60.0)
    except KeyboardInterrupt:
        for p in procs:
            p.kill()
        raise
    if res.rc != 0:
        shutil.rmtree(f"{job.out}.regrow-tmp", ignore_errors=True)
        if res.failed_how.startswith("killed"):
            print(f"error: regrow failed: {res.describe()}", file=sys.stderr, flush=True)
    return res.rc


def _run(args, plan, k: int, job: _Job) -> tuple:
    """This rank's part: write the target files into OUT.regrow-tmp and seal them. Returns (info, rank,
    every rank's counters: bytes read, state bytes, peak RSS, files opened, verified, unverified)."""
    import resource

    import torch

    from megagrow import collectives, memory
    from megagrow.state.executor import regrow, regrow_offline
    from megagrow.state.manifest import checkpoint_meta, seal
    from megagrow.state.writer import init_ranks, supported

    stage = plan.stages[k]
    offline = supported(stage.layout)  # ZeRO-1/2/3: the files are written directly, no engine is built
    if offline:
        rank = init_ranks(stage.layout)
    else:
        from megagrow.parallel.groups import init_distributed

        init_distributed(stage.layout)
        rank = torch.distributed.get_rank()
    dist = torch.distributed.is_initialized()
    memory.return_large_frees()  # the fill's and the gathers' temporaries go back to the OS when freed
    memory.reset_peak()  # the regrow's own peak from here: the source's metadata and every import are loaded
    rss_before = memory.status().get("VmRSS", 0)
    tmp = f"{job.out}.regrow-tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    if dist:
        collectives.barrier()
    try:
        info = (regrow_offline if offline else regrow)(
            plan, k, job.src, tmp, args.grow, progress=(rank == 0 and not args.json), verify=job.verify, growth=job.growth
        )
        t_seal = time.perf_counter()
        seal(
            tmp,
            info["tag"],
            checkpoint_meta(
                plan,
                k,
                info["step"],
                info["sample_offset"] + info["step"] * stage.layout.global_batch,
                source=f"{job.src.dir}/{job.src.tag}",
            ),
            tp=stage.layout.tp,
        )
        info.setdefault("phase_seconds", {})["seal"] = time.perf_counter() - t_seal  # checksums, fsync, manifest
        faults.point("regrow.sealed", info["step"])
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    peak_rss = memory.status().get("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux: KiB
    mine = torch.tensor(
        [
            float(info["bytes_read"]),
            float(info["bytes_written_state"]),
            peak_rss,
            float(info["files_opened"]),
            float(info["files_verified"]),
            float(-1 if info["files_unverified"] is None else info["files_unverified"]),
            float(rss_before),
        ],
        dtype=torch.float64,
    )
    allr = collectives.all_gather(mine) if dist else [mine]  # on the CPU: collectives runs it on the device under NCCL
    return info, rank, allr


def _report(args, stage, job: _Job, info: dict, allr: list) -> None:
    """Rank 0: move OUT.regrow-tmp to OUT and print the summary (JSON with --json)."""
    out, src = job.out, job.src
    if os.path.isdir(out):
        os.rmdir(out)
    os.replace(f"{out}.regrow-tmp", out)
    written = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(out) for f in fs)
    summary = {
        "out": out,
        "stage": stage.name,
        "layout": stage.layout.to_dict(),
        "op": info["op"],
        "tag": info["tag"],
        "source": {
            "dir": src.dir,
            "tag": src.tag,
            "stage": src.record.stage.name,
            "layout": src.record.stage.layout.to_dict(),
            "bytes": sum(os.path.getsize(f) for f in src.files()),
        },
        "bytes_read_per_rank": [int(t[0]) for t in allr],
        "state_bytes_per_rank": [int(t[1]) for t in allr],
        # RSS when the rank began its part (interpreter, imports, the source's metadata), and the peak above
        # it while it read, filled, wrote and sealed its files
        "rss_before_bytes_per_rank": [int(t[6]) for t in allr],
        "peak_rss_bytes_per_rank": [int(t[2]) for t in allr],
        "rss_growth_bytes_per_rank": [int(t[2] - t[6]) for t in allr],
        "files_opened_per_rank": [int(t[3]) for t in allr],  # source files: its metadata file + the optimizer files it read
        # checksums checked by each rank before reading (the files it opens, each by one of the ranks that open
        # it; rank 0 also the metadata file); opened unchecked (-1: not asked)
        "files_verified_per_rank": [int(t[4]) for t in allr],
        "files_unverified_per_rank": [int(t[5]) for t in allr],
        "bytes_written": written,
        "seconds": time.perf_counter() - job.t0,
        "phase_seconds_rank0": {k: round(v, 3) for k, v in info["phase_seconds"].items()},
    }
    print(
        json.dumps(summary)
        if args.json
        else f"regrow: {summary['source']['stage']} -> {stage.name} ({info['op']}) at {stage.layout.to_dict()}\n"
        f"  wrote {out} ({written / 1e6:.1f} MB) in {summary['seconds']:.1f} s; "
        f"read per rank {[round(b / 1e6, 2) for b in summary['bytes_read_per_rank']]} MB",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
