"""Finding and reading the raw text documents that become a token dataset.

One input file is one document, except ``.jsonl`` files where every non-blank line is a JSON
object whose ``"text"`` string is one document. Text is decoded leniently (undecodable bytes
become U+FFFD) so that any file can be read; ``.py`` files honour their PEP 263 coding cookie
and BOM.

The default corpus, used when no input is named, is the ``.py`` source of the Python standard
library of the running interpreter (``sysconfig.get_paths()["stdlib"]``, site-packages
excluded): about 30 MB of text that exists on every machine, so the demo never downloads data.
"""

from __future__ import annotations

import io
import json
import os
import sysconfig
import tokenize
from typing import Iterable, Iterator

from megagrow.errors import UserError

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".jsonl")
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn"}
_DEFAULT_SKIP_DIRS = _SKIP_DIRS | {"site-packages", "dist-packages"}


def stdlib_dir() -> str:
    """The standard library directory of the running interpreter."""
    return sysconfig.get_paths()["stdlib"]


def _walk(root: str, suffixes: tuple[str, ...], skip_dirs: set[str]) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        for name in filenames:
            if name.endswith(suffixes):
                out.append(os.path.join(dirpath, name))
    out.sort()
    return out


def default_corpus_files() -> list[str]:
    """The embedded default corpus: the stdlib's ``.py`` files, sorted, without site-packages."""
    root = stdlib_dir()
    if not os.path.isdir(root):
        raise UserError(f"the Python standard library directory {root} does not exist; "
                        "name an input with --input")
    return _walk(root, (".py",), _DEFAULT_SKIP_DIRS)


def find_input_files(paths: Iterable[str], max_files: int | None = None) -> list[str]:
    """Expand files and directories into a deterministic list of input files.

    Directories are searched recursively for files ending in one of ``TEXT_SUFFIXES``
    (sorted by path); files named explicitly are taken whatever their suffix. Order: inputs
    in the order given, duplicates dropped; ``max_files`` keeps the first N.
    """
    files: list[str] = []
    seen: set[str] = set()
    for p in paths:
        if not os.path.exists(p):
            raise UserError(f"input path not found: {p}")
        found = [p] if not os.path.isdir(p) else _walk(p, TEXT_SUFFIXES, _SKIP_DIRS)
        for f in found:
            if not os.path.exists(f):  # found by the walk, but a symlink to nothing
                raise UserError(f"input file {f} is a dangling symlink (to {os.readlink(f)!r}); remove it or fix the link")
            if not os.path.isfile(f):
                raise UserError(f"input {f} is not a regular file")
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                files.append(f)
    if max_files is not None:
        files = files[:max_files]
    return files


def read_text(path: str) -> str:
    """The text of one file, decoded leniently (``.py``: coding cookie / BOM honoured)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read input file {path}: {e.strerror or e}") from None
    encoding = "utf-8-sig"
    if path.endswith(".py"):
        try:
            encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        except SyntaxError:
            encoding = "utf-8-sig"
    try:
        return data.decode(encoding, errors="replace")
    except LookupError:  # unknown codec named in a coding cookie
        return data.decode("utf-8", errors="replace")


def read_documents(path: str) -> Iterator[str]:
    """The documents of one input file (one, or one per ``.jsonl`` line); empty ones skipped."""
    text = read_text(path)
    if not path.endswith(".jsonl"):
        if text:
            yield text
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        doc = record.get("text") if isinstance(record, dict) else None
        if not isinstance(doc, str):
            raise UserError(f"{path}:{lineno}: expected a JSON object with a string \"text\" field")
        if doc:
            yield doc
