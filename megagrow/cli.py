"""The `megagrow` command.

    megagrow train PLAN --stage K [--run-dir DIR]   one stage (under torchrun or srun)
    megagrow plan ...                              the scaling-law stage planner
    megagrow bench ...                             throughput / overhead benchmarks
"""

from __future__ import annotations

import argparse
import os
import sys

from megagrow.errors import UserError, cli_entry


def _train(args) -> int:
    from megagrow.config import load_plan

    plan = load_plan(args.plan)
    k = plan.stages.index(plan.stage(args.stage))
    if args.data:
        import dataclasses

        plan = dataclasses.replace(plan, data=plan.data.replace(prefix=args.data))
    run_dir = args.run_dir or os.path.join("runs", plan.name)
    from megagrow.train import train_stage

    return train_stage(plan, k, run_dir, stop_at=args.stop_at)


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
    t.set_defaults(fn=_train)
    sub.add_parser("plan", help="scaling-law stage planner (megagrow plan --help)", add_help=False)
    sub.add_parser("bench", help="benchmarks (megagrow bench --help)", add_help=False)
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "plan":
        from megagrow.plan_cli import main as plan_main

        return plan_main(argv[1:])
    if argv and argv[0] == "bench":
        from megagrow.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
