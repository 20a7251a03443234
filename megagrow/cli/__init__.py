"""The `megagrow` command line: every command is a subcommand of `megagrow` (megagrow/cli/commands.py).

    commands.py         the `megagrow` entry point and its subcommands (train, run, status, verify, ...)
    plan.py             `megagrow plan`: the scaling-law stage planner
    regrow.py           `megagrow regrow`: a stage checkpoint -> the next stage's, at any layout
    export.py           `megagrow export-hf`: a stage checkpoint -> a transformers model directory
    export_megatron.py  `megagrow export-megatron`: a stage checkpoint -> a Megatron-LM checkpoint

`python -m megagrow.cli ...` runs the same command (megagrow/cli/__main__.py).
"""

from megagrow.cli.commands import _mark_failed, _peer_lost, build_parser, main

__all__ = ["main", "build_parser", "_mark_failed", "_peer_lost"]
