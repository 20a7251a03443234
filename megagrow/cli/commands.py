"""The `megagrow` command.

    megagrow train PLAN --stage K [--run-dir DIR]   one stage (under torchrun or srun)
    megagrow run PLAN [--run-dir DIR]              the whole plan, stage after stage (locally or under Slurm)
    megagrow status DIR [--json]                   progress of a run directory
    megagrow verify CKPT [--json]                  check a checkpoint against its manifest
    megagrow plan ...                              the scaling-law stage planner
    megagrow bench PLAN --stage K ...              throughput, TFLOP/s, MFU, overhead, transition cost
    megagrow plot RUN [RUN ...] --out fig.png      eval/training loss vs FLOPs, stage boundaries marked
    megagrow export-hf CKPT OUT                    a checkpoint -> a transformers model directory
    megagrow export-megatron CKPT OUT              a checkpoint -> a Megatron-LM checkpoint
    megagrow regrow --src CKPT --plan PLAN ...     a stage checkpoint -> the next stage's (or resharded)
    megagrow prepare-data --out PREFIX ...         text -> tokenizer + memory-mapped token dataset
    megagrow savings run|list|report ...           the savings experiment (staged vs from-scratch at equal FLOPs)
    megagrow growth-dynamics ...                   the paper's training-dynamics check at tiny scale

Plans loaded from the command line take `--set KEY=VALUE` overrides (megagrow.config.apply_overrides).
"""

from __future__ import annotations

import argparse
import os
import sys

from megagrow.errors import EXIT_PEER_LOST, MegagrowError, RunFailure, UserError, cli_entry

# numeric options and their least value: refused before anything starts (one line, exit 2)
_LEAST = {"stop_at": 0, "max_procs": 1, "max_nodes": 1, "retries": 0, "grace": 0}


def _check_numbers(args) -> None:
    import math

    for name, least in _LEAST.items():
        v = getattr(args, name, None)
        if v is not None and not (math.isfinite(v) and v >= least):
            kind = "a number of seconds" if isinstance(v, float) else "an integer"
            raise UserError(f"--{name.replace('_', '-')} must be {kind} >= {least}, got {v:g}")


def _train(args) -> int:
    from megagrow.signals import install_early

    _check_numbers(args)
    install_early()  # a preemption signal during the imports below still ends in a clean save
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        print(
            f"[megagrow] rank {os.environ['SLURM_PROCID']}/{os.environ.get('SLURM_NTASKS')} on "
            f"{os.environ.get('SLURMD_NODENAME', os.uname().nodename)}",
            flush=True,
        )
    from megagrow.config import load_plan
    from megagrow.paths import default_run_dir

    plan = load_plan(args.plan, args.set or ())
    k = plan.stages.index(plan.stage(args.stage))
    if args.data:
        import dataclasses

        plan = dataclasses.replace(plan, data=plan.data.replace(prefix=args.data))
    run_dir = args.run_dir or default_run_dir(plan.name)
    from megagrow.procs import exit_rank
    from megagrow.train import train_stage

    try:
        rc = train_stage(plan, k, run_dir, stop_at=args.stop_at)
    except MegagrowError as e:  # one line; the stage is marked failed when it diverged or could not save
        if isinstance(e, RunFailure):
            _mark_failed(run_dir, plan.stages[k].name, str(e))
        raise
    except Exception as e:  # noqa: BLE001 - a collective that failed: one line, not a gloo/NCCL traceback
        if not _peer_lost(e):
            raise
        rank = _launcher_rank()
        rank = "?" if rank is None else rank
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"error: stage {plan.stages[k].name}: rank {rank} lost contact with another rank ({first[:200]}); another "
            f"rank died or hung (the launcher names it); run again to resume from the newest complete checkpoint",
            file=sys.stderr,
            flush=True,
        )
        _mark_failed(run_dir, plan.stages[k].name, "lost contact with another rank")
        sys.stdout.flush()
        os._exit(EXIT_PEER_LOST)  # no teardown: destroying groups with a dead peer can block
    exit_rank(rc)  # every rank meets at a barrier, then exits without interpreter shutdown


def _peer_lost(e: BaseException) -> bool:
    """A failed or timed-out collective (gloo/NCCL), as opposed to a bug."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}:
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and any(
        s in msg
        for s in (
            "gloo",
            "Gloo",
            "NCCL",
            "Connection closed by peer",
            "Connection reset by peer",
            "Timed out waiting",
            "Broken pipe",
            "Socket Timeout",
            "Connection refused",
        )
    )


def _launcher_rank() -> int | None:
    """This process's global rank as its launcher gave it (torchrun: RANK, srun: SLURM_PROCID), or
    None when neither says: a rank that failed before torch.distributed started knows no more."""
    for k in ("RANK", "SLURM_PROCID"):
        v = os.environ.get(k, "").strip()
        if v.isdigit():
            return int(v)
    return None


def _mark_failed(run_dir: str, stage: str, msg: str) -> None:
    """The global rank 0 only: status.json says "failed" (not "running") after a stage stopped on an
    error; best effort. Rank 0 is the launcher's (RANK, or SLURM_PROCID under srun), so a start-up that
    fails before the process group exists has one writer, not one per rank; a process that no
    launcher numbered (`megagrow train` run by hand, one process) is rank 0."""
    rank = _launcher_rank()
    if rank is None:
        import torch.distributed as dist  # loaded by now: the stage started

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank != 0:
        return
    from megagrow.fsutil import write_json_atomic
    from megagrow.paths import RunPaths

    path = RunPaths(run_dir).stage(stage).status
    try:
        import json
        import time

        old = {}
        if os.path.isfile(path):
            with open(path) as f:
                old = json.load(f)
        if isinstance(old, dict) and os.path.isdir(os.path.dirname(path)):
            new = {**old, "state": "failed", "error": msg[:300], "time": time.time()}
            try:
                write_json_atomic(path, new)
            except OSError:  # disk full: rewrite in place (a small file keeps its blocks) rather than say "running"
                with open(path, "r+") as f:
                    f.write(json.dumps(new))
                    f.truncate()
    except (OSError, ValueError):
        pass


def _run(args) -> int:
    from megagrow.controller import run_main

    _check_numbers(args)
    return run_main(args)


def _status(args) -> int:
    from megagrow.controller import status_main

    return status_main(args)


def _verify(args) -> int:
    from megagrow.state.verify import checkpoint_dir_problem, verify_main

    problem = checkpoint_dir_problem(args.ckpt)
    if problem:
        raise UserError(problem)
    return verify_main(args)


SET_HELP = (
    "override one plan value, as if written in the YAML (repeatable): a dotted key, stages.NAME (or INDEX, or *) "
    "for a stage's keys, and a YAML value, e.g. --set stages.wide.optim.lr=2e-3 --set reliability.keep_last=3"
)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megagrow", description="Staged training of transformer language models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser(
        "train",
        help="train one stage of a plan (run under torchrun or srun, one process per rank)",
        description="Train one stage of a plan. Resumes from the stage's latest checkpoint in the run "
        "directory if there is one. SIGUSR1/SIGTERM: save at the next step and exit 75.",
    )
    t.add_argument("plan", help="stage plan YAML (see recipes/)")
    t.add_argument("--stage", default="0", help="stage index (0-based) or name (default 0)")
    t.add_argument("--run-dir", help="run directory (default runs/<plan name>)")
    t.add_argument("--data", help="override the plan's dataset prefix (PREFIX.bin/.idx)")
    t.add_argument("--stop-at", type=int, help="save and stop at this step even if the stage is longer")
    _add_set(t)
    t.set_defaults(fn=_train)
    r = sub.add_parser(
        "run",
        help="train a whole plan: every stage and transition, each at its layout (locally or under Slurm)",
        description="Train a whole plan, resuming from the run directory. Locally one process per rank; inside a "
        "Slurm job srun per stage. Exit codes: 0 done (or handed on to a dependent job), 2 bad input (nothing "
        "launched), 75 preempted (a stage saved on SIGUSR1/SIGTERM: requeue / run again), other: a stage failed.",
    )
    r.add_argument("plan", help="stage plan YAML (see recipes/)")
    r.add_argument("--run-dir", help="run directory (default runs/<plan name>)")
    r.add_argument("--data", help="override the plan's dataset prefix (PREFIX.bin/.idx)")
    r.add_argument("--local", action="store_true", help="run on this machine even inside a Slurm job")
    r.add_argument("--max-procs", type=int, help="local process limit (default: usable CPU cores, or GPUs)")
    r.add_argument("--max-nodes", type=int, help="Slurm: most nodes a dependent job may ask for (default: the partition's)")
    r.add_argument("--grace", type=float, default=60.0, help="seconds the other ranks get after one rank fails (default 60)")
    r.add_argument(
        "--retries",
        type=int,
        help="launch a failed stage again this often, from its newest complete "
        "checkpoint (under Slurm on other hosts of the allocation where it has them), before the run is "
        "declared failed (default: the plan's reliability.retries, 2)",
    )
    r.add_argument("--dry-run", action="store_true", help="validate, print each stage's placement and the next action, launch nothing")
    _add_set(r)
    r.set_defaults(fn=_run)
    st = sub.add_parser("status", help="progress of a run directory (table, or --json)")
    st.add_argument("run_dir", help="run directory of `megagrow run`")
    st.add_argument("--json", action="store_true", help="JSON on stdout")
    st.set_defaults(fn=_status)
    v = sub.add_parser(
        "verify",
        help="check a checkpoint's files against its manifest (sizes and CRC-32 checksums)",
        description="Check a checkpoint tag (RUN/<stage>/checkpoints/step_N) or every tag of a checkpoint directory "
        "against the manifest megagrow wrote last when the save finished: every file present, with the recorded size "
        "and CRC-32. A tag without a manifest is a save that never finished. Exit 0 when every tag checked is "
        "complete, 1 otherwise, 2 on bad input.",
    )
    v.add_argument("ckpt", help="a checkpoint tag directory, or a checkpoint directory holding tags")
    v.add_argument("--json", action="store_true", help="JSON on stdout: {ok, tags: [{tag, complete, problems, ...}]}")
    v.set_defaults(fn=_verify)
    for name, (_, about) in _DELEGATED.items():  # each parses its own arguments (megagrow NAME --help)
        sub.add_parser(name, help=f"{about} (megagrow {name} --help)", add_help=False)
    return p


# subcommands with their own argument parser: name -> (module:function, one-line help)
_DELEGATED = {
    "plan": ("megagrow.cli.plan:main", "scaling-law stage planner"),
    "bench": ("megagrow.bench:main", "throughput / MFU / overhead / transition benchmark"),
    "plot": ("megagrow.metrics.plot:main", "loss vs FLOPs of one or more runs to a PNG"),
    "export-hf": ("megagrow.cli.export:main", "a stage checkpoint -> a Hugging Face transformers model directory"),
    "export-megatron": ("megagrow.cli.export_megatron:main", "a stage checkpoint -> a Megatron-LM (megatron-core GPTModel) checkpoint"),
    "regrow": ("megagrow.cli.regrow:main", "a stage checkpoint -> the next stage's (or resharded) at the target layout"),
    "prepare-data": ("megagrow.data.prepare:main", "text files -> sentencepiece tokenizer + memory-mapped token dataset"),
    "savings": ("megagrow.results.driver:main", "the savings experiment: staged runs vs from-scratch baselines (run, list, report)"),
    "growth-dynamics": ("megagrow.results.dynamics:main", "the paper's training-dynamics check at tiny scale (CPU, one process)"),
}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _DELEGATED:
        import importlib

        module, fn = _DELEGATED[argv[0]][0].split(":")
        return getattr(importlib.import_module(module), fn)(argv[1:])
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
