"""`megagrow run PLAN`: validate the whole plan, take the run directory's lock, run the loop."""

from __future__ import annotations

import os
import signal
import sys

from megagrow.config import load_plan
from megagrow.controller.allocation import detect_allocation, place
from megagrow.controller.launch import Controller
from megagrow.controller.progress import next_action, read_progress
from megagrow.controller.validate import validate_plan
from megagrow.errors import EXIT_OK, UserError
from megagrow.fsutil import try_exclusive_lock
from megagrow.paths import RunPaths, default_run_dir


def lock_run_dir(run_dir: str):
    """One controller per run directory: an exclusive flock on RUN/.controller.lock, released when
    the process ends (however it ends). File systems without flock: a warning, and no lock."""
    path = RunPaths(run_dir).controller_lock
    try:
        os.makedirs(run_dir, exist_ok=True)
        f, why = try_exclusive_lock(path)
    except OSError as e:  # a read-only or full file system, no permission: nothing can be written there
        raise UserError(f"cannot write to the run directory {run_dir} ({e.strerror or e}: {e.filename or path})") from None
    if why == "held":
        raise UserError(f"another `megagrow run` is working on {run_dir} (it holds {path})")
    if why:
        print(f"warning: {why}; nothing stops a second `megagrow run` on this directory", file=sys.stderr, flush=True)
    return f


def _warn_if_overrides_changed(run_dir: str, overrides: tuple) -> None:
    """A run resumed with other `--set` overrides than it was started with: one warning line (the
    plan may differ from the one its checkpoints record; a different model chain is refused anyway)."""
    from megagrow.controller.progress import read_manifest

    m = read_manifest(run_dir)
    if m and "overrides" in m and list(m["overrides"]) != list(overrides):
        was = " ".join(f"--set {o}" for o in m["overrides"]) or "no --set"
        now = " ".join(f"--set {o}" for o in overrides) or "no --set"
        print(f"warning: {run_dir} was last run with {was}; this run has {now}", file=sys.stderr, flush=True)


def run_main(args) -> int:
    """`megagrow run PLAN`: validate everything, then the loop."""
    ctl_signals = []
    # catch a preemption signal from the very start (the loop installs its own handler below)
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, lambda n, f: ctl_signals.append(n))
    overrides = tuple(getattr(args, "set", None) or ())
    plan = load_plan(args.plan, overrides)
    data = args.data
    if data:
        import dataclasses

        plan = dataclasses.replace(plan, data=plan.data.replace(prefix=data))
    run_dir = args.run_dir or default_run_dir(plan.name)
    alloc = detect_allocation(local=args.local, max_procs=args.max_procs, max_nodes=args.max_nodes)
    spaced = [o for o in overrides if any(c.isspace() for c in o)]
    if spaced and alloc.kind == "slurm":  # a dependent job gets them through MEGAGROW_RUN_ARGS, split on white space
        raise UserError(
            f"--set {spaced[0]}: white space in an override cannot be handed on to a dependent Slurm job; write that value in the plan file"
        )
    validate_plan(plan, alloc, run_dir)
    _warn_if_overrides_changed(run_dir, overrides)
    progress = read_progress(plan, run_dir)
    act = next_action(plan, progress)
    if args.dry_run:
        pls = [place(s, alloc) for s in plan.stages]
        for s, pl, p in zip(plan.stages, pls, progress):
            where = ",".join(pl.hosts) if pl.fits else f"needs {pl.nodes} nodes: dependent job"
            print(
                f"{s.name:12s} {p.state:11s} {p.step}/{p.steps:<7d} tp {s.layout.tp} x dp {s.layout.dp} zero "
                f"{s.layout.zero_stage} {s.layout.dtype}: {pl.ntasks} ranks, {pl.nodes} node(s) [{where}]"
            )
        for p in progress:
            if p.note:
                print(f"note: {p.name}: {p.state}: {p.note}")
        print(f"next: {act.describe(plan)}")
        return EXIT_OK
    lock = lock_run_dir(run_dir)  # noqa: F841 - held until this process exits
    ctl = Controller(
        plan, args.plan, run_dir, alloc, data=data, grace_s=args.grace, retries=getattr(args, "retries", None), overrides=overrides
    )
    ctl.install_signals()
    if ctl_signals:
        ctl.stop = ctl_signals[0]
    return ctl.run()
