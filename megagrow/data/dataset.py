"""A memory-mapped token dataset: ``PREFIX.bin`` (the token ids) + ``PREFIX.idx`` (the header).

``PREFIX.bin``: every document's token ids followed by EOS, concatenated, as raw little-endian
``uint16`` (when ``vocab_size <= 65536``) or ``uint32``.

``PREFIX.idx`` (all little-endian)::

    offset  size  field
    0       8     magic  b"MGTOKDS\\0"
    8       4     version (uint32, = 1)
    12      4     dtype code (uint32: 1 = uint16, 2 = uint32)
    16      8     vocab_size (int64)
    24      8     eos_id (int64)
    32      8     num_tokens (int64)
    40      8     num_documents (int64)
    48      8*(num_documents+1)   document start offsets (int64, in tokens); the last = num_tokens

Document ``d`` occupies tokens ``[offsets[d], offsets[d+1])``, its EOS being the last of them.

Writing is atomic: ``DatasetWriter`` writes both files under temporary names and, only when
closed without error, removes any old ``.idx``, renames the ``.bin`` into place, then the
``.idx``. The ``.idx`` is the commit marker: a crash at any point leaves either the old
dataset, or a ``.bin`` without ``.idx`` (reported as missing), never a half-written pair that
reads as valid. On error the temporaries are removed.

Training reads fixed windows: with ``seq_len`` L, window ``i`` is tokens
``[i*L, i*L + L + 1)`` (inputs = the first L, targets = the last L), so consecutive windows
share one token and every token but the first is a target exactly once per epoch;
``num_windows(L) = (num_tokens - 1) // L``. Windows cross document boundaries (EOS separates them).
"""

from __future__ import annotations

import os
import struct
import uuid
from array import array
from collections.abc import Sequence

import numpy as np

from megagrow.errors import UserError
from megagrow.fsutil import unlink_quietly

MAGIC = b"MGTOKDS\0"
VERSION = 1
_HEADER = struct.Struct("<8sIIqqqq")  # magic, version, dtype code, vocab, eos, tokens, docs
HEADER_SIZE = _HEADER.size
_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
VALID_SUFFIX = ".valid"


def valid_prefix(prefix: str) -> str:
    """The held-out validation split written beside dataset ``prefix``: ``PREFIX.valid.bin/.idx``."""
    return prefix + VALID_SUFFIX


def has_valid_split(prefix: str) -> bool:
    v = valid_prefix(prefix)
    return os.path.isfile(v + ".idx") and os.path.isfile(v + ".bin")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits in it, else uint32."""
    if vocab_size < 1 or vocab_size > 1 << 32:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return _DTYPES[1] if vocab_size <= 1 << 16 else _DTYPES[2]


def _dtype_code(dtype: np.dtype) -> int:
    return next(code for code, dt in _DTYPES.items() if dt == dtype)


class DatasetWriter:
    """Append documents to a new dataset ``PREFIX.bin/.idx``; committed atomically on close.

    Use as a context manager (an exception inside the ``with`` block discards everything)::

        with DatasetWriter("data/stdlib", vocab_size=8192, eos_id=2) as w:
            for ids in documents:
                w.add_document(ids)   # writes ids, then eos_id
    """

    def __init__(self, prefix: str, vocab_size: int, eos_id: int = 2):
        self.prefix = prefix
        self.vocab_size = int(vocab_size)
        self.eos_id = int(eos_id)
        self.dtype = dtype_for_vocab(self.vocab_size)
        if not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"eos_id {eos_id} is not in [0, vocab_size={vocab_size})")
        self._offsets = array("q", [0])
        self._num_tokens = 0
        self._eos = np.array([self.eos_id], dtype=self.dtype)
        tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tmp_bin = f"{prefix}.bin.{tag}"
        self._tmp_idx = f"{prefix}.idx.{tag}"
        self._closed = False
        try:
            self._bin = open(self._tmp_bin, "wb", buffering=1 << 20)
        except OSError as e:
            raise UserError(f"cannot write dataset {prefix}.bin: {e.strerror or e}") from None

    @property
    def num_tokens(self) -> int:
        """Tokens written so far, EOS included."""
        return self._num_tokens

    @property
    def num_documents(self) -> int:
        return len(self._offsets) - 1

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one document's ids, then EOS. Ids must be in ``[0, vocab_size)``."""
        if self._closed:
            raise ValueError("DatasetWriter is closed")
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a document is a 1-D sequence of ids, got shape {arr.shape}")
        if arr.size:
            if arr.dtype.kind not in "iu":
                raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token id out of range [0, {self.vocab_size}): min {lo}, max {hi}")
            self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        self._bin.write(self._eos.tobytes())
        self._num_tokens += arr.size + 1
        self._offsets.append(self._num_tokens)

    def close(self) -> None:
        """Finish: write the index and move both files into place (atomically, see module doc)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            header = _HEADER.pack(
                MAGIC, VERSION, _dtype_code(self.dtype), self.vocab_size, self.eos_id, self._num_tokens, self.num_documents
            )
            with open(self._tmp_idx, "wb") as f:
                f.write(header)
                f.write(np.asarray(self._offsets, dtype="<i8").tobytes())
                f.flush()
                os.fsync(f.fileno())
            unlink_quietly(self.prefix + ".idx")
            os.replace(self._tmp_bin, self.prefix + ".bin")
            os.replace(self._tmp_idx, self.prefix + ".idx")
        except BaseException:
            self._discard()
            raise

    def abort(self) -> None:
        """Discard everything written; the final files are left untouched."""
        if not self._closed:
            self._closed = True
        self._discard()

    def _discard(self) -> None:
        try:
            self._bin.close()
        except OSError:
            pass
        unlink_quietly(self._tmp_bin)
        unlink_quietly(self._tmp_idx)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TokenWindows:
    """One token stream read as training windows: what TokenDataset and MegatronTokens share.
    A subclass sets ``_tokens`` (an array of ids), ``_num_tokens`` and ``_dtype``."""

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def tokens(self) -> np.ndarray:
        """All token ids (read-only memmap, stored dtype)."""
        return self._tokens

    def num_windows(self, seq_len: int) -> int:
        """Windows of ``seq_len+1`` tokens at stride ``seq_len``: ``(num_tokens-1) // seq_len``."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        return max(self._num_tokens - 1, 0) // seq_len

    def windows(self, indices: Sequence[int] | np.ndarray, seq_len: int) -> np.ndarray:
        """Windows ``[i*seq_len, i*seq_len + seq_len + 1)`` for each i: int64 [len(indices), seq_len+1]."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.num_windows(seq_len)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"window ids must be in [0, {n}) for seq_len {seq_len}, got min {idx.min()}, max {idx.max()}")
        pos = idx[:, None] * seq_len + np.arange(seq_len + 1, dtype=np.int64)[None, :]
        out = np.asarray(self._tokens[pos], dtype=np.int64)
        self._check_windows(out, idx)
        return out

    def _check_windows(self, out: np.ndarray, idx: np.ndarray) -> None:
        """A subclass whose ids are not checked when the dataset opens checks each read here."""


class TokenDataset(TokenWindows):
    """A read-only, memory-mapped view of ``PREFIX.bin/.idx`` (validated on open).

    Picklable (reopens the files by name rather than copying the tokens), so it can go to
    DataLoader worker processes.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._open()

    def _open(self) -> None:
        prefix = self.prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        hint = f"(create it with: python tools/prepare_data.py --out {prefix})"
        if not os.path.isfile(idx_path):
            raise UserError(f"dataset index not found: {idx_path} {hint}")
        if not os.path.isfile(bin_path):
            raise UserError(f"dataset tokens not found: {bin_path} {hint}")
        with open(idx_path, "rb") as f:
            raw = f.read()
        if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
            raise UserError(f"{idx_path} is not a megagrow token dataset index (bad magic)")
        _, version, code, vocab, eos, ntok, ndoc = _HEADER.unpack_from(raw)
        if version != VERSION:
            raise UserError(
                f"{idx_path}: unsupported dataset version {version} (this megagrow reads version {VERSION}); re-run tools/prepare_data.py"
            )
        if code not in _DTYPES:
            raise UserError(f"{idx_path}: unknown token dtype code {code}")
        if vocab < 1 or ntok < 0 or ndoc < 0 or not 0 <= eos < vocab:
            raise UserError(f"{idx_path}: corrupt header (vocab {vocab}, eos {eos}, tokens {ntok}, documents {ndoc})")
        expected = HEADER_SIZE + 8 * (ndoc + 1)
        if len(raw) != expected:
            raise UserError(f"{idx_path} is truncated or corrupt: {len(raw)} bytes, the header ({ndoc} documents) implies {expected}")
        offsets = np.frombuffer(raw, dtype="<i8", offset=HEADER_SIZE).astype(np.int64)
        if offsets[0] != 0 or offsets[-1] != ntok or (ndoc and np.any(np.diff(offsets) < 1)):
            raise UserError(f"{idx_path}: corrupt document offsets")
        dtype = _DTYPES[code]
        bin_size = os.path.getsize(bin_path)
        if bin_size != ntok * dtype.itemsize:
            raise UserError(
                f"{bin_path} has {bin_size} bytes but its index says {ntok} tokens x "
                f"{dtype.itemsize} bytes = {ntok * dtype.itemsize}: truncated, or not "
                f"from the same run as {idx_path}; re-run tools/prepare_data.py"
            )
        self._dtype = dtype
        self._vocab_size = int(vocab)
        self._eos_id = int(eos)
        self._num_tokens = int(ntok)
        self._offsets = offsets
        if ntok:
            self._tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(ntok,))
        else:
            self._tokens = np.zeros(0, dtype=dtype)

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self._open()

    # ---- facts -------------------------------------------------------------------------
    @property
    def num_documents(self) -> int:
        return len(self._offsets) - 1

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def document_offsets(self) -> np.ndarray:
        """int64 [num_documents + 1]: document starts, then num_tokens."""
        return self._offsets

    def document(self, d: int) -> np.ndarray:
        """Document ``d``'s ids as written to ``add_document`` (without its EOS), int64."""
        if not 0 <= d < self.num_documents:
            raise IndexError(f"document {d} out of range [0, {self.num_documents})")
        return np.asarray(self._tokens[self._offsets[d] : self._offsets[d + 1] - 1], dtype=np.int64)

    # ---- training windows ----------------------------------------------------------------
    def window(self, i: int, seq_len: int) -> np.ndarray:
        """Tokens ``[i*seq_len, i*seq_len + seq_len + 1)`` as int64 (length seq_len + 1)."""
        n = self.num_windows(seq_len)
        if not 0 <= i < n:
            raise IndexError(f"window {i} out of range [0, {n}) for seq_len {seq_len}")
        start = i * seq_len
        return np.asarray(self._tokens[start : start + seq_len + 1], dtype=np.int64)

    def __repr__(self) -> str:
        return f"TokenDataset({self.prefix!r}, tokens={self._num_tokens}, documents={self.num_documents}, vocab_size={self._vocab_size})"
