"""`megagrow export-hf` / tools/export_hf.py: a stage checkpoint -> a transformers model directory.

    megagrow export-hf CKPT OUT [--tag T] [--tokenizer PATH | --no-tokenizer] [--dtype fp32|bf16|fp16]
                       [--max-shard-size 5GB] [--json]

CKPT is a stage's checkpoint directory (RUN/<stage>/checkpoints, holding `latest`), the stage
directory above it, or one tag directory inside it; any layout (TP, DP, ZeRO 1-3, fp32 or
bf16 training). The tag read is --tag, else the newest complete (sealed) one, whatever `latest`
names; its files' checksums are checked first, and an incomplete or corrupted tag is refused with
one line naming the file and the next older complete tag, before anything is written. Only the fp32 master weights are read, tensor by tensor, through megagrow's
shard-map reader (no optimizer state, no DeepSpeed engine, one process). OUT receives
config.json (GPT2Config / LlamaConfig, read alike by transformers 4.x and 5.x: docs/interop.md),
generation_config.json, model.safetensors (or model-0000i-of-0000N.safetensors shards and
model.safetensors.index.json past --max-shard-size), megagrow.json (the source) and the tokenizer
(tokenizer.json + tokenizer_config.json naming PreTrainedTokenizerFast, model_max_length the
model's position capacity, and tokenizer.model for a sentencepiece source), written to OUT.export-tmp and renamed at the end; an existing non-empty OUT is refused.
The tokenizer is --tokenizer, else the plan's dataset tokenizer PREFIX.model (or
PREFIX.tokenizer.json) when it exists (a relative PREFIX: against the plan file's directory
that `megagrow run` recorded, then the current directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from megagrow.errors import UserError, cli_entry
from megagrow.fsutil import publish_dir

DTYPES = ("fp32", "bf16", "fp16")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megagrow export-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint directory (with 'latest'), its stage directory, or a tag directory")
    p.add_argument("out", help="output directory for the transformers model (must not exist or be empty)")
    p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    p.add_argument("--tokenizer", help="sentencepiece .model or tokenizer.json (default: the plan dataset's PREFIX.model)")
    p.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the saved weights (default fp32)")
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB, as transformers; one shard: model.safetensors)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return p


def resolve_checkpoint(path: str, tag: str | None, verify: bool = True) -> tuple[str, str]:
    """(checkpoint directory, tag) from a checkpoint dir, a stage dir or a tag dir. The tag is the one
    asked for, else the newest complete one (manifest.current, which says which newer ones it skips);
    verify: its files' checksums are checked too, before anything is read or written."""
    from megagrow.paths import StagePaths
    from megagrow.state.manifest import LATEST, current, tags

    if not os.path.isdir(path):
        raise UserError(f"checkpoint not found: {path}")
    stage_ckpt = StagePaths(path).ckpt
    if os.path.isfile(os.path.join(path, LATEST)):
        d = path
    elif os.path.isdir(stage_ckpt):
        d = stage_ckpt
    elif any(f.endswith("_model_states.pt") for f in os.listdir(path)):
        d, tag = os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    elif tag or tags(path):
        d = path
    else:
        raise UserError(f"{path}: no DeepSpeed checkpoint there ('latest', checkpoints/latest or *_model_states.pt)")
    return d, current(d, tag, verify=verify)


def plan_file_dir(ckpt_dir: str) -> str | None:
    """The directory of the plan file the run was started with, as `megagrow run` records it in
    RUN/manifest.json (RUN is two levels above a stage's checkpoint directory); None if unknown."""
    from megagrow.paths import RunPaths

    path = RunPaths(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_dir)))).manifest
    try:
        with open(path) as f:
            plan_file = json.load(f).get("plan_file")
    except (OSError, ValueError, AttributeError):
        return None
    return os.path.dirname(os.path.abspath(plan_file)) if isinstance(plan_file, str) and plan_file else None


def default_tokenizer(plan_dict: dict, ckpt_dir: str | None = None) -> str | None:
    """The plan dataset's tokenizer, PREFIX.model or PREFIX.tokenizer.json. A relative prefix is looked
    up against the plan file's directory (when the run recorded it), then the current directory: an
    export run from elsewhere than the training finds it."""
    prefix = (plan_dict.get("data") or {}).get("prefix")
    if not prefix:
        return None
    bases = [""] if os.path.isabs(prefix) else [b for b in (ckpt_dir and plan_file_dir(ckpt_dir),) if b] + [""]
    for base in bases:
        for suffix in (".model", ".tokenizer.json"):
            cand = os.path.join(base, prefix) + suffix
            if os.path.isfile(cand):
                return cand
    return None


def position_capacity(m, shapes: dict) -> int:
    """The positions the exported model takes: GPT-2 the rows of its position table as stored,
    llama (RoPE, no table) its max_positions, else seq_len."""
    if m.flavour == "gpt2" and "pos_emb.weight" in shapes:
        return int(shapes["pos_emb.weight"][0])
    return m.n_positions


def _checked_source(ckpt: str, out: str, tag: str | None, tokenizer: str | None, no_tokenizer: bool):
    """The argument checks, before anything is written: `out` must not be a non-empty directory or a
    file, the checkpoint tag must resolve (and verify), its model must be exportable, and a tokenizer
    must be found unless no_tokenizer. Returns (absolute out, checkpoint directory, open
    SourceCheckpoint, tokenizer path or None)."""
    from megagrow.hf import check_exportable
    from megagrow.state.checkpoint import SourceCheckpoint

    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"output {out} exists and is not an empty directory; refusing to overwrite")
    d, tag = resolve_checkpoint(ckpt, tag)
    src = SourceCheckpoint.open(d, tag)
    check_exportable(src.model)
    if not no_tokenizer:
        tokenizer = tokenizer or default_tokenizer(src.client.get("plan", {}), d)
        if tokenizer is None:
            raise UserError("no tokenizer: the plan's dataset has no PREFIX.model here; pass --tokenizer PATH or --no-tokenizer")
    return out, d, src, tokenizer


def _write_export(tmp: str, d: str, src, shapes: dict, tokenizer: str | None, dtype: str, progress: bool, max_shard_bytes: int):
    """The work: tokenizer, safetensors weights, config.json + generation_config.json and megagrow.json
    into `tmp`. Returns (weights summary of write_safetensors, the HF config, tokenizer info or None)."""
    import torch

    from megagrow.hf import hf_config, set_dtype, write_config, write_tokenizer
    from megagrow.interop.hf_export import write_safetensors

    m = src.model
    n_positions = position_capacity(m, shapes)
    tok_info = write_tokenizer(tokenizer, tmp, m.vocab_size, n_positions) if tokenizer is not None else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(shapes), desc="export-hf", unit="tensor", file=sys.stderr)

    def read(name):
        t = src.read_box(name, "w", tuple((0, n) for n in shapes[name]))
        if bar is not None:
            bar.update(1)
        return t

    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    # shard by shard; after each, the checkpoint's memory maps are dropped (their pages leave the process)
    weights = write_safetensors(tmp, m, shapes, read, tdtype, max_shard_bytes, after_shard=src.close)
    if bar is not None:
        bar.close()
    cfg = hf_config(m, tok_info and tok_info["bos_token_id"], tok_info and tok_info["eos_token_id"], n_positions)
    set_dtype(cfg, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype])
    write_config(cfg, m, tmp)  # config.json (read alike by transformers 4.x and 5.x) and generation_config.json
    with open(os.path.join(tmp, "megagrow.json"), "w") as f:  # where it came from
        json.dump(
            {
                "checkpoint": os.path.abspath(d),
                "tag": src.tag,
                "stage": src.client["stage"],
                "step": src.client.get("step"),
                "sample_index": src.client.get("sample_index"),
            },
            f,
            indent=1,
        )
    return weights, cfg, tok_info


def _export_summary(out: str, d: str, src, weights: dict, cfg, tok_info: dict | None, dtype: str, t0: float) -> dict:
    """The report: the summary dict `export` returns (and `--json` prints) of the finished `out`."""
    m = src.model
    return {
        "out": out,
        "architecture": cfg.architectures[0],
        "flavour": m.flavour,
        "checkpoint": os.path.abspath(d),
        "tag": src.tag,
        "stage": src.client["stage"]["name"],
        "step": src.client.get("step"),
        "source_layout": src.client["stage"]["layout"],
        "params": weights["params"],
        "vocab_size": m.vocab_size,
        "dtype": dtype,
        "tokenizer": tok_info,
        "bytes_read": src.bytes_read,
        "weight_files": weights["files"],
        "largest_shard_bytes": weights["largest_shard"],
        "largest_tensor_bytes": weights["largest_tensor"],
        "bytes_written": sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def export(
    ckpt: str,
    out: str,
    tag: str | None = None,
    tokenizer: str | None = None,
    no_tokenizer: bool = False,
    dtype: str = "fp32",
    progress: bool = False,
    max_shard_size: str | int = "5GB",
) -> dict:
    """Write the transformers directory `out` from the checkpoint; returns the summary. The weights are
    safetensors shards of at most max_shard_size (megagrow/interop/hf_export.py), one tensor in memory at a time.
    Everything is written to OUT.export-tmp, renamed to `out` at the end and removed on any failure."""
    from megagrow.hf import need_hf

    need_hf()
    from megagrow.interop.hf_export import parse_size

    t0 = time.perf_counter()
    max_shard_bytes = parse_size(max_shard_size)
    out, d, src, tokenizer = _checked_source(ckpt, out, tag, tokenizer, no_tokenizer)
    shapes = src.logical_shapes()
    with publish_dir(out) as tmp:
        weights, cfg, tok_info = _write_export(tmp, d, src, shapes, None if no_tokenizer else tokenizer, dtype, progress, max_shard_bytes)
    return _export_summary(out, d, src, weights, cfg, tok_info, dtype, t0)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.tokenizer and args.no_tokenizer:
        raise UserError("--tokenizer and --no-tokenizer exclude each other")
    try:
        s = export(
            args.ckpt,
            args.out,
            args.tag,
            args.tokenizer,
            args.no_tokenizer,
            args.dtype,
            progress=not (args.no_progress or args.json),
            max_shard_size=args.max_shard_size,
        )
    except OSError as e:  # a read-only or full destination, no permission: nothing is left behind (export's cleanup)
        raise UserError(f"export-hf to {args.out}: {e.strerror or e}: {e.filename or args.out}") from None
    if args.json:
        print(json.dumps(s))
    else:
        print(
            f"export-hf: {s['stage']} step {s['step']} ({s['flavour']}, {s['params']:,} params) -> {s['out']} "
            f"as {s['architecture']} ({s['bytes_written'] / 1e6:.1f} MB, {s['dtype']}) in {s['seconds']:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
