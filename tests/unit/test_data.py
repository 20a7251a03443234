"""megagrow.data: tokenizer, token dataset, global sampler, prepare_data CLI (fast, CPU only)."""

from __future__ import annotations

import fnmatch
import gzip
import json
import os
import shutil
import string
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # so that plain `pytest` works from a checkout without installing
    sys.path.insert(0, REPO)

from megagrow.data import (  # noqa: E402
    DatasetWriter,
    GlobalSampler,
    TokenDataset,
    Tokenizer,
    default_corpus_files,
    get_batch,
    rank_slice,
    train_tokenizer,
)
from megagrow.errors import UserError  # noqa: E402

VOCAB = 400
# ~35 KB of ASCII-only stdlib source (few distinct characters, so vocab 400 is enough)
SMALL_FILES = [textwrap.__file__, string.__file__, fnmatch.__file__]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("tok") / "small")
    return train_tokenizer(SMALL_FILES, prefix, VOCAB, seed=0)


# ---- tokenizer -----------------------------------------------------------------------------


def test_tokenizer_roundtrip_decode_encode_is_identity(tok_path):
    """decode(encode(text)) == text exactly: code, whitespace runs, unseen unicode, NUL, CRLF."""
    tok = Tokenizer(tok_path)
    assert tok.vocab_size == VOCAB and tok.eos_id == 2
    samples = [
        open(SMALL_FILES[0], encoding="utf-8").read(),
        "def f(x):\n\n        return x  \t# trailing  \r\n",
        "  leading spaces, ünïcödé ✓ 𝔘 漢字 \x00 end",
        "",
        "\n\n\n",
    ]
    for text in samples:
        ids = tok.encode(text)
        assert all(0 <= i < VOCAB for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(np.asarray(ids, dtype=np.uint16)) == text
    # encodings concatenate (no dummy prefix) and EOS decodes to nothing
    a, b = "alpha = 1\n", "beta = 2\n"
    assert tok.decode(tok.encode(a) + [tok.eos_id] + tok.encode(b)) == a + b
    assert tok.encode_batch([a, b]) == [tok.encode(a), tok.encode(b)]


def test_tokenizer_training_is_deterministic(tok_path, tmp_path):
    """Same files, vocab size and seed -> byte-identical model file; no temp files left."""
    again = train_tokenizer(SMALL_FILES, str(tmp_path / "again"), VOCAB, seed=0)
    assert open(again, "rb").read() == open(tok_path, "rb").read()
    assert sorted(os.listdir(tmp_path)) == ["again.model"]


def test_tokenizer_rejects_too_small_vocab_and_missing_model(tmp_path):
    """A vocab below the byte-fallback minimum and a missing model file are UserErrors."""
    with pytest.raises(UserError, match="vocab size"):
        train_tokenizer(SMALL_FILES, str(tmp_path / "t"), 100)
    with pytest.raises(UserError, match="not found"):
        Tokenizer(str(tmp_path / "nope.model"))
    assert os.listdir(tmp_path) == []


# ---- dataset -------------------------------------------------------------------------------


def _random_docs(vocab: int, eos: int, n: int = 20, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(0, 50))) for _ in range(n)]


@pytest.mark.parametrize("vocab,dtype", [(VOCAB, np.uint16), (65536, np.uint16), (70000, np.uint32)])
def test_dataset_reads_back_exactly_the_tokens_written(tmp_path, vocab, dtype):
    """Every document + EOS comes back bitwise, with the right dtype, counts and offsets."""
    prefix = str(tmp_path / "ds")
    docs = _random_docs(vocab, eos=2)
    docs[3] = np.array([vocab - 1, 0, 2], dtype=np.int64)  # extreme ids
    with DatasetWriter(prefix, vocab, eos_id=2) as w:
        for d in docs:
            w.add_document(d)
    ds = TokenDataset(prefix)
    expected = np.concatenate([np.append(d, 2) for d in docs]).astype(np.int64)
    assert ds.dtype == dtype and ds.vocab_size == vocab and ds.eos_id == 2
    assert ds.num_tokens == len(expected) and ds.num_documents == len(docs)
    assert np.array_equal(np.asarray(ds.tokens, dtype=np.int64), expected)
    assert os.path.getsize(prefix + ".bin") == len(expected) * np.dtype(dtype).itemsize
    for i, d in enumerate(docs):
        assert np.array_equal(ds.document(i), d)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]  # no temporaries left


def test_dataset_windows_are_stride_seq_len_spans_of_seq_len_plus_one(tmp_path):
    """num_windows = (N-1)//L and window(i) = tokens[i*L : i*L+L+1], as int64."""
    prefix = str(tmp_path / "ds")
    with DatasetWriter(prefix, 1000, eos_id=2) as w:
        w.add_document(np.arange(3, 103))  # 100 ids + EOS = 101 tokens
    ds = TokenDataset(prefix)
    tokens = np.asarray(ds.tokens, dtype=np.int64)
    for seq_len in (1, 7, 10, 100):
        n = ds.num_windows(seq_len)
        assert n == (ds.num_tokens - 1) // seq_len
        for i in range(n):
            win = ds.window(i, seq_len)
            assert win.dtype == np.int64 and win.shape == (seq_len + 1,)
            assert np.array_equal(win, tokens[i * seq_len : i * seq_len + seq_len + 1])
        assert np.array_equal(ds.windows(list(range(n))[::-1], seq_len), np.stack([ds.window(i, seq_len) for i in range(n)][::-1]))
        with pytest.raises(IndexError):
            ds.window(n, seq_len)


def test_dataset_header_validation_gives_user_errors(tmp_path):
    """Missing files, bad magic, truncated .bin or .idx -> UserError naming the problem."""
    prefix = str(tmp_path / "ds")
    with pytest.raises(UserError, match="not found"):
        TokenDataset(prefix)
    with DatasetWriter(prefix, VOCAB) as w:
        for d in _random_docs(VOCAB, 2):
            w.add_document(d)
    TokenDataset(prefix)  # valid
    bin_bytes, idx_bytes = open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()

    open(prefix + ".bin", "wb").write(bin_bytes[:-2])  # one token short
    with pytest.raises(UserError, match="truncated"):
        TokenDataset(prefix)
    open(prefix + ".bin", "wb").write(bin_bytes)

    open(prefix + ".idx", "wb").write(b"NOTMAGIC" + idx_bytes[8:])
    with pytest.raises(UserError, match="bad magic"):
        TokenDataset(prefix)
    open(prefix + ".idx", "wb").write(idx_bytes[:-8])
    with pytest.raises(UserError, match="truncated"):
        TokenDataset(prefix)
    os.unlink(prefix + ".idx")
    with pytest.raises(UserError, match="not found"):
        TokenDataset(prefix)


def test_dataset_writer_error_leaves_old_dataset_and_no_temporaries(tmp_path):
    """An exception inside `with DatasetWriter` discards the new data; the old files survive."""
    prefix = str(tmp_path / "ds")
    with DatasetWriter(prefix, VOCAB) as w:
        w.add_document([5, 6, 7])
    before = open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()
    with pytest.raises(RuntimeError):
        with DatasetWriter(prefix, VOCAB) as w:
            w.add_document([8, 9])
            raise RuntimeError("boom")
    with pytest.raises(ValueError):  # an out-of-range id is refused, and the file discarded
        with DatasetWriter(prefix, VOCAB) as w:
            w.add_document([VOCAB])
    assert (open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()) == before
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]


# ---- sampler -------------------------------------------------------------------------------


def test_sampler_is_deterministic_and_covers_every_window_once_per_epoch():
    """Same seed -> same indices; each epoch is a permutation; epochs and seeds differ."""
    n = 37
    a, b, c = GlobalSampler(n, seed=1), GlobalSampler(n, seed=1), GlobalSampler(n, seed=2)
    first = a.indices(0, 3 * n)
    assert np.array_equal(first, b.indices(0, 3 * n))
    assert not np.array_equal(first[:n], c.indices(0, n))
    for e in range(3):
        epoch = first[e * n : (e + 1) * n]
        assert sorted(epoch.tolist()) == list(range(n))
        assert np.array_equal(epoch, np.random.Generator(np.random.PCG64([1, e])).permutation(n))
    assert not np.array_equal(first[:n], first[n : 2 * n])
    # window_of, batch_indices (straddling an epoch boundary) and a fresh sampler all agree
    assert [a.window_of(g) for g in range(3 * n)] == first.tolist()
    assert np.array_equal(GlobalSampler(n, 1).batch_indices(4, 8), first[32:40])


def test_rank_slice_layout_and_validation():
    """Rank r at micro-step j takes [(j*dp + r)*mb, +mb); a batch that doesn't factor is refused."""
    assert rank_slice(8, 2, 1, 2, 2, 0) == (2, 4)
    assert rank_slice(8, 2, 0, 2, 2, 1) == (4, 6)
    assert rank_slice(8, 4, 3, 1, 2, 1) == (7, 8)
    with pytest.raises(ValueError, match="global_batch"):
        rank_slice(8, 3, 0, 2, 1, 0)
    with pytest.raises(ValueError):
        rank_slice(8, 2, 2, 2, 2, 0)  # rank out of range
    with pytest.raises(ValueError):
        rank_slice(8, 2, 0, 2, 2, 2)  # micro-step out of range


def test_global_batch_is_the_same_samples_whatever_the_dp_layout(tmp_path):
    """For B=8, the samples all ranks' micro-steps take, ordered by position, are identical for
    (dp,mb,ga) = (1,8,1), (2,2,2), (4,1,2) and equal batch_indices; get_batch agrees with it."""
    prefix = str(tmp_path / "ds")
    with DatasetWriter(prefix, 1000, eos_id=2) as w:
        w.add_document(np.arange(3, 3 + 200) % 1000)
    ds, seq_len, B = TokenDataset(prefix), 4, 8
    sampler = GlobalSampler(ds.num_windows(seq_len), seed=3)  # 50 windows: step 6 crosses an epoch
    for step in (0, 1, 6):
        expected = sampler.batch_indices(step, B)
        per_layout = []
        for dp, mb, ga in [(1, 8, 1), (2, 2, 2), (4, 1, 2)]:
            by_pos: dict[int, int] = {}
            tokens_by_pos: dict[int, np.ndarray] = {}
            for r in range(dp):
                for j in range(ga):
                    start, stop = rank_slice(B, dp, r, mb, ga, j)
                    x, y, g0 = get_batch(ds, sampler, seq_len, step, B, dp, r, mb, ga, j)
                    assert g0 == step * B + start
                    assert x.shape == y.shape == (mb, seq_len) and str(x.dtype) == "torch.int64"
                    for k, p in enumerate(range(start, stop)):
                        assert p not in by_pos
                        by_pos[p] = sampler.window_of(g0 + k)
                        win = ds.window(by_pos[p], seq_len)
                        assert np.array_equal(x[k].numpy(), win[:-1])
                        assert np.array_equal(y[k].numpy(), win[1:])
                        tokens_by_pos[p] = x[k].numpy()
            assert sorted(by_pos) == list(range(B))
            ordered = [by_pos[p] for p in range(B)]
            assert ordered == expected.tolist()
            per_layout.append(np.stack([tokens_by_pos[p] for p in range(B)]))
        assert all(np.array_equal(per_layout[0], t) for t in per_layout[1:])


# ---- prepare_data CLI ----------------------------------------------------------------------


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "prepare_data.py"), *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_prepare_cli_end_to_end_json_and_readback(tmp_path):
    """3 small files -> tokenizer + dataset; JSON fields right; dataset decodes to the inputs;
    a second run reuses PREFIX.model and produces identical files."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    texts = {
        src / "a.py": open(SMALL_FILES[0], encoding="utf-8").read(),
        src / "sub" / "b.md": open(SMALL_FILES[1], encoding="utf-8").read(),
        src / "c.jsonl": "".join(json.dumps({"text": t}) + "\n" for t in ["first record ✓", "second\nrecord"]),
    }
    for path, text in texts.items():
        path.write_text(text, encoding="utf-8")
    (src / "ignored.bin").write_bytes(b"\x00\x01")
    prefix = str(tmp_path / "out" / "ds")  # the output directory is created

    r = _run_cli("--out", prefix, "--input", str(src), "--vocab-size", str(VOCAB), "--json", "--no-progress", "--valid-fraction", "0")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert {"prefix", "tokenizer", "vocab_size", "documents", "tokens", "seconds"} <= set(info)
    assert info["prefix"] == prefix and info["tokenizer"] == prefix + ".model"
    assert info["vocab_size"] == VOCAB and info["documents"] == 4 and info["tokenizer_trained"]
    ds = TokenDataset(prefix)
    assert ds.num_tokens == info["tokens"] and ds.num_documents == 4 and ds.vocab_size == VOCAB
    tok = Tokenizer(info["tokenizer"])
    docs = [tok.decode(ds.document(i)) for i in range(ds.num_documents)]
    assert docs == [texts[src / "a.py"], "first record ✓", "second\nrecord", texts[src / "sub" / "b.md"]]
    assert sorted(os.listdir(tmp_path / "out")) == ["ds.bin", "ds.idx", "ds.model"]

    bin_before = open(prefix + ".bin", "rb").read()
    r2 = _run_cli("--out", prefix, "--input", str(src), "--json", "--no-progress", "--valid-fraction", "0")
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout)["tokenizer_trained"] is False
    assert open(prefix + ".bin", "rb").read() == bin_before


def test_prepare_cli_missing_input_is_one_line_error_exit_2(tmp_path):
    """A missing --input path: exit 2, exactly one stderr line 'error: ...', no traceback,
    nothing written."""
    r = _run_cli("--out", str(tmp_path / "ds"), "--input", str(tmp_path / "missing"))
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert os.listdir(tmp_path) == []


def test_prepare_cli_other_user_errors(tmp_path):
    """Too-small vocab and a directory with no text files: one-line errors, exit 2."""
    (tmp_path / "empty").mkdir()
    for args, needle in [
        (["--vocab-size", "100", "--input", SMALL_FILES[0]], "vocab-size"),
        (["--input", str(tmp_path / "empty")], "no input files"),
    ]:
        r = _run_cli("--out", str(tmp_path / "ds"), *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.startswith("error:") and needle in r.stderr
        assert len(r.stderr.splitlines()) == 1
    assert os.listdir(tmp_path) == ["empty"]


def test_default_corpus_is_sorted_stdlib_py_without_site_packages():
    """The default corpus: the stdlib's .py files, sorted, none under site-packages."""
    files = default_corpus_files()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.endswith(".py") and "site-packages" not in f.split(os.sep) for f in files)
    assert os.path.realpath(textwrap.__file__) in {os.path.realpath(f) for f in files}


# ---- man pages (prepare_data.py --input-kind man) ------------------------------------------

_MAN_PAGE = r""".\" Copyright line: a comment, not text
.TH FROBNICATE 1 2024-01-01 "megagrow 1.0" "User Commands"
.SH NAME
frobnicate \- turn widgets into gadgets
.SH SYNOPSIS
.B frobnicate
[\fB\-\-fast\fR]
.I widget
.SH DESCRIPTION
.B frobnicate
converts every
.I widget
it is given into a shiny gadget.
.TP
.B \-\-fast
Skip the careful polishing step.
.SH SEE ALSO
.BR gadget (5)
"""


def test_prepare_cli_man_pages_render_to_plain_text_one_document_each(tmp_path, tok_path):
    """--input-kind man: a page becomes one plain-text document (no roff, no overstrikes); a
    .so redirect page, a translation and a non-page file are no documents; an unreadable page
    is skipped and counted; no temporaries are left."""
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (Debian/Ubuntu: apt-get install groff-base)")
    man = tmp_path / "man"
    (man / "man1").mkdir(parents=True)
    (man / "de" / "man1").mkdir(parents=True)
    (man / "man1" / "frobnicate.1").write_text(_MAN_PAGE)
    with gzip.open(man / "man1" / "frob.1.gz", "wt") as f:  # an alias: only a .so redirect
        f.write('.\\" alias of frobnicate\n.so man1/frobnicate.1\n')
    (man / "man1" / "broken.1.gz").write_bytes(b"not gzip data")
    (man / "man1" / "README").write_text("not a man page\n")
    (man / "de" / "man1" / "frobnicate.1").write_text(_MAN_PAGE.replace("shiny gadget", "glänzendes Ding"))
    prefix = str(tmp_path / "out" / "ds")

    r = _run_cli(
        "--out",
        prefix,
        "--input",
        str(man),
        "--input-kind",
        "man",
        "--tokenizer",
        tok_path,
        "--json",
        "--no-progress",
        "--valid-fraction",
        "0",
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    counts = [info[k] for k in ("documents", "man_pages", "man_redirects_skipped", "man_render_failed")]
    assert counts == [1, 1, 1, 1], info
    assert "broken.1.gz" in r.stderr and "Traceback" not in r.stderr
    ds = TokenDataset(prefix)
    text = Tokenizer(prefix + ".model").decode(ds.document(0))
    for words in [
        "FROBNICATE(1)",
        "NAME",
        "frobnicate - turn widgets into gadgets",
        "DESCRIPTION",
        "frobnicate converts every widget it is given into a shiny gadget.",
        "fast",
        "Skip the careful polishing step.",
        "SEE ALSO",
        "gadget(5)",
    ]:
        assert words in text, (words, text)
    assert "\b" not in text and "\x1b" not in text and "\\f" not in text and "Copyright" not in text
    assert not any(line.startswith((".", "'")) for line in text.splitlines()), text
    assert "glänzendes" not in text and "not a man page" not in text
    assert sorted(os.listdir(tmp_path / "out")) == ["ds.bin", "ds.idx", "ds.model"]


def test_prepare_cli_man_pages_without_groff_is_one_line_error(tmp_path):
    """--input-kind man with no groff on PATH: exit 2, one line naming groff, nothing written."""
    (tmp_path / "man" / "man1").mkdir(parents=True)
    (tmp_path / "man" / "man1" / "x.1").write_text(_MAN_PAGE)
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "prepare_data.py"),
            "--out",
            str(tmp_path / "out" / "ds"),
            "--input",
            str(tmp_path / "man"),
            "--input-kind",
            "man",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PATH": str(tmp_path / "no-bin")},
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error:") and "groff" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["man"]
