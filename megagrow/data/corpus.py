"""Finding and reading the raw text documents that become a token dataset.

One input file is one document, except ``.jsonl`` files where every non-blank line is a JSON
object whose ``"text"`` string is one document. Text is decoded leniently (undecodable bytes
become U+FFFD) so that any file can be read; ``.py`` files honour their PEP 263 coding cookie
and BOM.

Manual pages (``prepare_data.py --input-kind man``): roff sources named NAME.N or NAME.N.gz in
``manN`` directories, each rendered to plain text by groff (one document per page); see
``find_man_pages`` and ``render_man_page``.

The default corpus, used when no input is named, is the ``.py`` source of the Python standard
library of the running interpreter (``sysconfig.get_paths()["stdlib"]``, site-packages
excluded): about 30 MB of text that exists on every machine, so the demo never downloads data.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import subprocess
import sysconfig
import tokenize
import zlib
from collections.abc import Iterable, Iterator

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
        raise UserError(f"the Python standard library directory {root} does not exist; name an input with --input")
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
            raise UserError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
        if doc:
            yield doc


# ---- manual pages --------------------------------------------------------------------------

_MAN_SECTION_DIR = re.compile(r"man\d\w*")  # man1, man3, man3pm
_MAN_PAGE_NAME = re.compile(r".+\.\d\w*(\.gz)?")  # ls.1, openssl.1ssl.gz
_ROFF_NOTHING = re.compile(rb"\s*|[.'][ \t]*(\\[\"#].*)?")  # blank, empty request, comment (.\" ...)
_OVERSTRIKE = re.compile(r".\x08")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# man or mdoc macros, tbl always, input UTF-8 unless tagged otherwise, 80 columns; no
# hyphenation; grotty: no escape sequences, no overstrikes for bold, italic or underline
GROFF_ARGS = ("-t", "-Dutf-8", "-mandoc", "-Tutf8", "-rLL=80n", "-rLT=80n", "-rHY=0", "-P-cbou")
# read before each page: left-adjusted text (not justified with runs of spaces), and .ad
# (of pages, tbl, the man macros) made a no-op so that it stays so
_ROFF_PRELUDE = b".na\n.de ad\n..\n"
MAN_RENDER_TIMEOUT = 120  # seconds per page


class ManPageError(Exception):
    """A man page that could not be read or rendered (skipped and counted, not fatal)."""


def find_man_pages(paths: Iterable[str], max_files: int | None = None) -> list[str]:
    """The man page sources under ``paths``: files named like NAME.N or NAME.N.gz in a ``manN``
    directory, sorted; a file named explicitly is taken whatever its name. A directory that
    holds ``manN`` directories is descended only into those, so the translations beside them
    (``/usr/share/man/de/``, ...) are skipped. Links to a page already found and dangling links
    are dropped; ``max_files`` keeps the first N."""
    files: list[str] = []
    seen: set[str] = set()
    for p in paths:
        if not os.path.exists(p):
            raise UserError(f"input path not found: {p}")
        found = [p]
        if os.path.isdir(p):
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                sections = [d for d in dirnames if _MAN_SECTION_DIR.fullmatch(d)]
                dirnames[:] = sections or [d for d in dirnames if d not in _SKIP_DIRS]
                if _MAN_SECTION_DIR.fullmatch(os.path.basename(dirpath)):
                    found += [os.path.join(dirpath, n) for n in filenames if _MAN_PAGE_NAME.fullmatch(n)]
            found.sort()
        for f in found:
            key = os.path.realpath(f)
            if os.path.isfile(f) and key not in seen:
                seen.add(key)
                files.append(f)
    return files[:max_files] if max_files is not None else files


def render_man_page(path: str, groff: str = "groff") -> str | None:
    """The plain text of man page source ``path`` (roff, or gzipped roff) rendered by groff
    (``GROFF_ARGS``): 80 columns, left-adjusted, no overstrikes or escape sequences, trailing
    blanks and runs of blank lines squeezed. None for a page that is only a ``.so`` redirect to
    another page (that one is a document of its own). Raises ManPageError on failure."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise ManPageError(f"cannot read: {e}") from None
    code = [line for line in data.splitlines() if not _ROFF_NOTHING.fullmatch(line)]
    if len(code) == 1 and re.match(rb"\.so\s", code[0]):
        return None
    man_dir = os.path.dirname(os.path.abspath(path))
    root = os.path.dirname(man_dir) if _MAN_SECTION_DIR.fullmatch(os.path.basename(man_dir)) else man_dir
    try:  # run in the man root, where ".so man7/x.7" resolves
        r = subprocess.run([groff, *GROFF_ARGS], input=_ROFF_PRELUDE + data, capture_output=True, cwd=root, timeout=MAN_RENDER_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ManPageError(f"groff took more than {MAN_RENDER_TIMEOUT} s") from None
    except OSError as e:
        raise ManPageError(f"cannot run {groff}: {e.strerror or e}") from None
    text = _ANSI.sub("", _OVERSTRIKE.sub("", r.stdout.decode("utf-8", errors="replace")))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in text.splitlines())).strip("\n")
    if r.returncode != 0 or not text:
        err = r.stderr.decode("utf-8", errors="replace").strip().splitlines()
        raise ManPageError(f"groff exit {r.returncode}" + (f": {err[-1]}" if err else ", no output"))
    return text + "\n"
