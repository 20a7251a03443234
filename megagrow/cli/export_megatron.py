"""`megagrow export-megatron` / tools/export_megatron.py: a stage checkpoint -> a Megatron-LM checkpoint.

    megagrow export-megatron CKPT OUT [--tag T] [--iteration N] [--json]

CKPT as for export-hf (a stage's checkpoint directory, its stage directory or one tag directory; any
layout; the newest complete tag unless --tag). OUT receives Megatron-LM's legacy `torch` checkpoint
layout at tensor and pipeline parallel 1 (latest_checkpointed_iteration.txt,
iter_NNNNNNN/mp_rank_00/model_optim_rng.pt holding a megatron-core GPTModel state dict for the local
layer spec) and megagrow.json (the source and the Megatron-LM arguments that build the model),
written to OUT.export-tmp and renamed at the end. Names, layouts and how Megatron-LM loads it:
megagrow/interop/megatron.py, docs/interop.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from megagrow.errors import UserError, cli_entry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megagrow export-megatron", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint directory (with 'latest'), its stage directory, or a tag directory")
    p.add_argument("out", help="output directory for the Megatron-LM checkpoint (must not exist or be empty)")
    p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    p.add_argument("--iteration", type=int, help="the iteration to record (default: the checkpoint's step)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from megagrow.cli.export import resolve_checkpoint
    from megagrow.interop.megatron import export_megatron

    args = _parser().parse_args(argv)
    d, tag = resolve_checkpoint(args.ckpt, args.tag)  # the newest complete tag unless --tag; checksums verified
    try:
        s = export_megatron(d, tag, args.out, args.iteration)
    except OSError as e:  # a read-only or full destination: export_megatron has removed its temporary directory
        raise UserError(f"export-megatron to {args.out}: {e.strerror or e}: {e.filename or args.out}") from None
    if args.json:
        print(json.dumps(s))
    else:
        print(
            f"export-megatron: {s['stage']} step {s['step']} ({s['flavour']}, {s['params']:,} params) -> {s['out']} "
            f"iteration {s['iteration']} ({s['bytes_written'] / 1e6:.1f} MB) in {s['seconds']:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
