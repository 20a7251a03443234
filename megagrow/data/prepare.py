"""``tools/prepare_data.py``: text files -> sentencepiece tokenizer + token dataset.

    python tools/prepare_data.py --out data/stdlib [--input PATH ...] [--vocab-size 8192]
                                 [--tokenizer EXISTING.model] [--max-files N]
                                 [--valid-fraction 0.005] [--input-kind text|man] [--json]

Inputs are files or directories (searched recursively for .py/.txt/.md/.rst/.jsonl; a .jsonl
line's "text" field is a document, any other file is one document). Without --input the
default corpus is the Python standard library's .py source (see megagrow.data.corpus).

``--input-kind man``: the inputs are manual pages instead (e.g. ``--input /usr/share/man``): files
named NAME.N or NAME.N.gz in manN directories, English only (the translations beside the manN
directories are skipped), links to a page already found and pages that are only a ``.so``
redirect skipped. groff renders each to plain text, one document per page, into a temporary
directory beside the output (removed at the end); a page that fails to render is skipped and
counted. The summary's input_files/input_bytes are then the rendered pages and their bytes.

Tokenizer: --tokenizer if given (a sentencepiece .model, or a Hugging Face tokenizer.json:
needs the `hf` extra), copied next to the dataset as PREFIX.model / PREFIX.tokenizer.json (the
other kind removed, so the dataset names one tokenizer); else PREFIX.model if it exists; else
one is trained to PREFIX.model. Then every document is encoded and written, followed by EOS, to PREFIX.bin and
PREFIX.idx (megagrow.data.dataset). Outputs appear atomically or not at all.

Validation split: ``--valid-fraction`` f (default 0.005) of the documents, at least one, chosen
by a permutation drawn from ``--seed`` (whole documents, so no held-out text is ever trained
on), go to PREFIX.valid.bin/.idx instead; the rest, in their original order, to PREFIX.bin/.idx.
The same inputs and seed give the same split. Fewer than two documents cannot be split (an
error); ``--valid-fraction 0`` writes no split (and removes a stale one). The tokenizer is
trained on all documents.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from megagrow.data.corpus import (
    TEXT_SUFFIXES,
    ManPageError,
    default_corpus_files,
    find_input_files,
    find_man_pages,
    read_documents,
    render_man_page,
    stdlib_dir,
)
from megagrow.data.dataset import DatasetWriter, TokenDataset, valid_prefix
from megagrow.data.tokenizer import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE, Tokenizer, load_tokenizer, train_tokenizer
from megagrow.errors import UserError, cli_entry
from megagrow.fsutil import unlink_quietly

DEFAULT_VOCAB_SIZE = 8192
ENCODE_BATCH_BYTES = 4 << 20  # encode this much text per sentencepiece call
DEFAULT_VALID_FRACTION = 0.005
_SPLIT_STREAM = 0x5EED_0FF  # second word of the split permutation's seed (the first is --seed)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megagrow prepare-data",
        description="Train (or reuse) a sentencepiece BPE tokenizer and write a memory-mapped token dataset PREFIX.bin/PREFIX.idx.",
    )
    p.add_argument(
        "--out", required=True, metavar="PREFIX", help="output prefix: writes PREFIX.bin, PREFIX.idx (+ PREFIX.model if trained)"
    )
    p.add_argument(
        "--input",
        action="extend",
        nargs="+",
        default=[],
        metavar="PATH",
        help=f"input files or directories (recursively: {', '.join(TEXT_SUFFIXES)}); default: the Python standard library's .py files",
    )
    p.add_argument(
        "--input-kind",
        choices=("text", "man"),
        default="text",
        help="text: the files as they are (default); man: manual pages (NAME.N[.gz] in manN "
        "directories, e.g. /usr/share/man, translations skipped), each rendered to plain "
        "text by groff",
    )
    p.add_argument("--vocab-size", type=int, default=None, help=f"vocab size of a newly trained tokenizer (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="use this existing tokenizer: a sentencepiece .model or a "
        "Hugging Face tokenizer.json (copied to PREFIX.model / PREFIX.tokenizer.json)",
    )
    p.add_argument("--max-files", type=int, default=None, metavar="N", help="use only the first N input files (in sorted order)")
    p.add_argument(
        "--max-sentences",
        type=int,
        default=300_000,
        metavar="N",
        help="at most N text blocks (sampled) for tokenizer training (default 300000)",
    )
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=DEFAULT_VALID_FRACTION,
        metavar="F",
        help="hold out this fraction of the documents (whole documents, at least one) as "
        f"PREFIX.valid.bin/.idx for validation loss; 0: no split (default {DEFAULT_VALID_FRACTION})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of tokenizer training and of the validation split (default 0)")
    p.add_argument("--threads", type=int, default=2, help="threads for sentencepiece (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return p


def _prepare_out_dir(prefix: str) -> None:
    if not prefix or prefix.endswith(("/", os.sep)) or os.path.isdir(prefix):
        raise UserError(f"--out must be a file prefix such as data/stdlib, got {prefix!r}")
    out_dir = os.path.dirname(os.path.abspath(prefix))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"output directory {out_dir} is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".prepare-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"output directory not writable: {out_dir} ({e.strerror or e})") from None


def held_out_documents(num_documents: int, fraction: float, seed: int):
    """Sorted ids of the documents of the validation split: max(1, round(f x n)) of them, the
    first of a permutation drawn from (seed, a fixed stream id). Raises UserError when the
    training split would be empty."""
    import numpy as np

    if fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    k = max(1, int(round(fraction * num_documents)))
    if num_documents - k < 1:
        raise UserError(
            f"{num_documents} document(s) are too few for a validation split (--valid-fraction "
            f"{fraction} holds out {k} whole document(s) and leaves none to train on): give more "
            "documents, or --valid-fraction 0 for no split"
        )
    perm = np.random.Generator(np.random.PCG64([seed, _SPLIT_STREAM])).permutation(num_documents)
    return np.sort(perm[:k]).astype(np.int64)


def _split(all_prefix: str, prefix: str, fraction: float, seed: int) -> tuple[int, int]:
    """Copy dataset `all_prefix` into PREFIX.valid (held-out documents) and PREFIX (the rest).
    Returns (validation documents, validation tokens)."""
    import numpy as np

    ds = TokenDataset(all_prefix)
    held = held_out_documents(ds.num_documents, fraction, seed)
    is_held = np.zeros(ds.num_documents, dtype=bool)
    is_held[held] = True
    off = ds.document_offsets
    valid = DatasetWriter(valid_prefix(prefix), ds.vocab_size, ds.eos_id)
    train = DatasetWriter(prefix, ds.vocab_size, ds.eos_id)
    try:
        for d in range(ds.num_documents):
            (valid if is_held[d] else train).add_document(ds.tokens[off[d] : off[d + 1] - 1])
        n_valid_tokens = valid.num_tokens
        valid.close()
        train.close()  # committed last: a complete PREFIX.idx means both files are in place
    except BaseException:
        valid.abort()
        train.abort()
        raise
    return len(held), n_valid_tokens


def _load_tokenizer(path: str, requested_vocab: int | None, how: str):
    tok = load_tokenizer(path)
    if requested_vocab is not None and requested_vocab != tok.vocab_size:
        raise UserError(
            f"{how} tokenizer {path} has vocab size {tok.vocab_size} but --vocab-size "
            f"{requested_vocab} was given (delete it to train a new one, or drop "
            "--vocab-size)"
        )
    return tok


def _adopt_tokenizer(path: str, prefix: str) -> str:
    """Copy tokenizer `path` next to the dataset (PREFIX.model or PREFIX.tokenizer.json, written
    atomically) and remove the other kind, so that the dataset names exactly one tokenizer."""
    import shutil

    mine = prefix + (".tokenizer.json" if path.endswith(".json") else ".model")
    other = prefix + (".model" if path.endswith(".json") else ".tokenizer.json")
    if not (os.path.exists(mine) and os.path.samefile(path, mine)):
        tmp = f"{mine}.tmp-{os.getpid()}"
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, mine)
        except BaseException:
            unlink_quietly(tmp)
            raise
    unlink_quietly(other)
    return mine


def _render_man_pages(pages: list[str], groff: str, out_dir: str, threads: int, progress: bool) -> tuple[list[str], dict]:
    """Render man pages (`threads` at a time) to out_dir/NNNNNN.txt, in the order of `pages`.
    Returns those files and the counts of the summary."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def render(page: str):
        try:
            return render_man_page(page, groff)
        except ManPageError as e:
            return e

    files: list[str] = []
    redirects, failed = 0, []
    pool = ThreadPoolExecutor(threads)
    try:
        with tqdm(total=len(pages), unit="page", desc="rendering", file=sys.stderr, disable=not progress, mininterval=1.0) as bar:
            for page, text in zip(pages, pool.map(render, pages)):
                bar.update()
                if text is None:
                    redirects += 1
                elif isinstance(text, ManPageError):
                    failed.append(f"{page}: {text}")
                else:
                    files.append(os.path.join(out_dir, f"{len(files):06d}.txt"))
                    with open(files[-1], "w", encoding="utf-8", newline="") as f:
                        f.write(text)
    finally:
        pool.shutdown(cancel_futures=True)
    if failed:
        print(f"warning: skipped {len(failed)} man page(s) that failed to render, e.g. {failed[0]}", file=sys.stderr)
    return files, {"man_pages": len(files), "man_redirects_skipped": redirects, "man_render_failed": len(failed)}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    scratch: list[str] = []  # directories removed at the end, however it ends: rendered man pages
    try:
        return _prepare(args, scratch)
    finally:
        for d in scratch:
            shutil.rmtree(d, ignore_errors=True)


def _check_args(args) -> None:
    if args.vocab_size is not None and not MIN_VOCAB_SIZE <= args.vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(
            f"--vocab-size {args.vocab_size} is out of range: it must be between "
            f"{MIN_VOCAB_SIZE} (3 special + 256 byte pieces + characters) and "
            f"{MAX_VOCAB_SIZE}"
        )
    if args.max_files is not None and args.max_files < 1:
        raise UserError(f"--max-files must be >= 1, got {args.max_files}")
    if args.max_sentences < 1:
        raise UserError(f"--max-sentences must be >= 1, got {args.max_sentences}")
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if not 0.0 <= args.valid_fraction < 1.0:
        raise UserError(f"--valid-fraction must be in [0, 1), got {args.valid_fraction}")


def _input_files(args, scratch: list[str], progress: bool) -> tuple[list[str], dict]:
    """The files to tokenize (man pages rendered to text first, into a scratch directory) and the
    man-page counts of the summary."""
    looked_for = ", ".join(TEXT_SUFFIXES)
    groff = None
    if args.input_kind == "man":
        if not args.input:
            raise UserError("--input-kind man needs --input: a man directory such as /usr/share/man")
        groff = shutil.which("groff")
        if groff is None:
            raise UserError("--input-kind man needs groff, which is not on PATH (Debian/Ubuntu: apt-get install groff-base)")
        files = find_man_pages(args.input, args.max_files)
        source, looked_for = " ".join(args.input), "NAME.N or NAME.N.gz in manN directories"
    elif args.input:
        files = find_input_files(args.input, args.max_files)
        source = " ".join(args.input)
    else:
        files = default_corpus_files()
        if args.max_files is not None:
            files = files[: args.max_files]
        source = f"{stdlib_dir()} (.py, default corpus)"
    if not files:
        raise UserError(f"no input files found in {source} (looked for {looked_for})")
    man_summary = {}
    if groff:  # the rendered pages become the input files
        _prepare_out_dir(args.out)
        scratch.append(tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(args.out)), prefix=f".{os.path.basename(args.out)}.man-tmp"))
        files, man_summary = _render_man_pages(files, groff, scratch[-1], args.threads, progress)
        if not files:
            raise UserError(f"none of the man pages in {source} rendered to text")
    return files, man_summary


def _tokenizer_for(args, files: list[str], progress: bool):
    """(tokenizer, trained): the one given, the dataset's existing one, or a new one trained on `files`."""
    own_model = args.out + ".model"
    if args.tokenizer:
        return _load_tokenizer(args.tokenizer, args.vocab_size, "the"), False
    if os.path.exists(own_model):
        tok = _load_tokenizer(own_model, args.vocab_size, "existing")
        if progress:
            print(f"reusing tokenizer {own_model} (vocab {tok.vocab_size}); delete it to retrain", file=sys.stderr)
        return tok, False
    vocab = args.vocab_size or DEFAULT_VOCAB_SIZE
    if progress:
        print(f"training tokenizer: vocab {vocab}, {len(files)} file(s) ...", file=sys.stderr, flush=True)
    train_tokenizer(files, args.out, vocab, max_sentences=args.max_sentences, seed=args.seed, num_threads=args.threads)
    return Tokenizer(own_model), True


def _write_dataset(args, files: list[str], tok, input_bytes: int, progress: bool) -> tuple[int, int, int, int]:
    """Tokenize `files` into PREFIX (and PREFIX.valid with a split). Returns (documents, tokens,
    validation documents, validation tokens)."""
    split = args.valid_fraction > 0
    # with a split, everything is tokenized into a temporary dataset first (the document count,
    # hence which documents are held out, is known only at the end), then copied in two
    all_prefix = f"{args.out}.all-tmp{os.getpid()}" if split else args.out
    try:
        documents, tokens, valid_docs, valid_tokens = _tokenize(args, files, tok, all_prefix, input_bytes, progress)
        if split:
            valid_docs, valid_tokens = _split(all_prefix, args.out, args.valid_fraction, args.seed)
            documents, tokens = documents - valid_docs, tokens - valid_tokens
        else:
            for ext in (".idx", ".bin"):  # a stale split of an earlier run would not match these tokens
                unlink_quietly(valid_prefix(args.out) + ext)
    finally:
        if split:
            for ext in (".idx", ".bin"):
                unlink_quietly(all_prefix + ext)
    return documents, tokens, valid_docs, valid_tokens


def _prepare(args, scratch: list[str]) -> int:
    t_start = time.perf_counter()
    _check_args(args)
    progress = not args.no_progress
    files, man_summary = _input_files(args, scratch, progress)
    input_bytes = sum(os.path.getsize(f) for f in files)
    if not any(f.endswith(".jsonl") for f in files):  # one document per file: check the split before any work
        held_out_documents(len(files), args.valid_fraction, args.seed)
    _prepare_out_dir(args.out)

    t0 = time.perf_counter()
    tok, trained = _tokenizer_for(args, files, progress)
    tokenizer_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    documents, tokens, valid_docs, valid_tokens = _write_dataset(args, files, tok, input_bytes, progress)
    tokenize_seconds = time.perf_counter() - t1
    tok_path = _adopt_tokenizer(args.tokenizer, args.out) if args.tokenizer else tok.path
    split = args.valid_fraction > 0
    summary = {
        "prefix": args.out,
        "tokenizer": tok_path,
        "vocab_size": tok.vocab_size,
        "documents": documents,
        "tokens": tokens,
        "valid_prefix": valid_prefix(args.out) if split else None,
        "valid_documents": valid_docs,
        "valid_tokens": valid_tokens,
        "seconds": round(time.perf_counter() - t_start, 3),
        "tokenizer_trained": trained,
        "tokenizer_seconds": round(tokenizer_seconds, 3),
        "tokenize_seconds": round(tokenize_seconds, 3),
        "input_files": len(files),
        "input_bytes": input_bytes,
        **man_summary,
    }
    print(json.dumps(summary) if args.json else _describe(args, summary))
    return 0


def _describe(args, s: dict) -> str:
    """The human-readable summary of a prepared dataset."""
    how = f"trained in {s['tokenizer_seconds']:.1f} s" if s["tokenizer_trained"] else "reused"
    lines = [
        f"tokenizer  {s['tokenizer']}: vocab {s['vocab_size']} ({how})",
        f"dataset    {args.out}.bin/.idx: {s['documents']:,} documents, {s['tokens']:,} tokens "
        f"from {s['input_files']:,} files, {s['input_bytes'] / 1e6:.1f} MB "
        f"({s['input_bytes'] / max(s['tokens'] + s['valid_tokens'], 1):.2f} bytes/token), tokenized in "
        f"{s['tokenize_seconds']:.1f} s",
    ]
    if s["valid_prefix"]:
        lines.append(
            f"validation {s['valid_prefix']}.bin/.idx: {s['valid_documents']:,} documents, "
            f"{s['valid_tokens']:,} tokens (--valid-fraction {args.valid_fraction}, seed {args.seed})"
        )
    else:
        lines.append("validation none (--valid-fraction 0): runs on this data log no eval loss")
    if "man_pages" in s:
        lines.append(
            f"man pages  {s['man_pages']:,} rendered, {s['man_redirects_skipped']:,} "
            f".so redirects skipped, {s['man_render_failed']:,} failed to render"
        )
    lines.append(f"total      {s['seconds']:.1f} s")
    return "\n".join(lines)


def _tokenize(args, files, tok, out_prefix: str, input_bytes: int, progress: bool) -> tuple[int, int, int, int]:
    from tqdm import tqdm

    with (
        DatasetWriter(out_prefix, tok.vocab_size, tok.eos_id) as writer,
        tqdm(
            total=input_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr, disable=not progress, mininterval=1.0
        ) as bar,
    ):
        batch: list[str] = []
        batch_bytes = 0  # file bytes covered by `batch`, for the progress bar
        batch_chars = 0

        def flush() -> None:
            nonlocal batch, batch_bytes, batch_chars
            for ids in tok.encode_batch(batch, num_threads=args.threads):
                writer.add_document(ids)
            bar.update(batch_bytes)
            batch, batch_bytes, batch_chars = [], 0, 0

        for path in files:
            for doc in read_documents(path):
                batch.append(doc)
                batch_chars += len(doc)
            batch_bytes += os.path.getsize(path)
            if batch_chars >= ENCODE_BATCH_BYTES:
                flush()
        if batch or batch_bytes:
            flush()
        documents, tokens = writer.num_documents, writer.num_tokens
        if documents == 0:  # raised inside the `with`: the writer discards its files
            raise UserError(f"no text in the {len(files)} input file(s): all are empty")
    return documents, tokens, 0, 0


if __name__ == "__main__":
    sys.exit(main())
