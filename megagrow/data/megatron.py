"""Megatron-LM indexed datasets as a megagrow data source.

A corpus tokenized for Megatron-LM (``tools/preprocess_data.py``, or megatron-core's
``IndexedDatasetBuilder``) is a pair ``PREFIX.bin`` / ``PREFIX.idx``: the ``.bin`` holds every
sequence's token ids back to back (Megatron's dtype: uint16 for vocabularies under 65500, else
int32), the ``.idx`` (magic ``MMIDIDX\\0\\0``) their lengths, byte offsets and document
boundaries. It is read here through megatron-core's own ``IndexedDataset`` (memory-mapped);
megagrow only checks that the sequences lie back to back and then reads the ``.bin`` as one token
stream, exactly as its own format is read: window ``i`` of length ``seq_len + 1`` starts at token
``i * seq_len`` (windows cross document boundaries, as Megatron's GPTDataset samples do; the
documents carry an end-of-document token when preprocess_data.py ran with ``--append-eod``).
The global-sample-index sampler sits on top unchanged.

The Megatron ``.idx`` records neither the vocabulary size nor the EOS id: ``vocab_size`` is
None, and every window read is checked against the model's vocabulary instead (``vocab_limit``),
as are the first million tokens when the dataset is opened.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from megagrow.data.dataset import TokenWindows
from megagrow.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
CHECK_AT_OPEN = 1 << 20  # tokens checked against the vocabulary when the dataset is opened


def is_megatron(prefix: str) -> bool:
    """Whether PREFIX.idx is a Megatron indexed-dataset index (by its magic)."""
    try:
        with open(prefix + ".idx", "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


class MegatronTokens(TokenWindows):
    """A Megatron indexed dataset as one token stream, with TokenDataset's window interface."""

    vocab_size = None  # not recorded by the format
    eos_id = None

    def __init__(self, prefix: str, vocab_limit: int | None = None):
        from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

        self.prefix, self.vocab_limit = prefix, vocab_limit
        bin_path = prefix + ".bin"
        if not os.path.isfile(bin_path):
            raise UserError(f"Megatron dataset tokens not found: {bin_path}")
        try:
            self.ds = IndexedDataset(prefix, multimodal=False, mmap=True)
        except (AssertionError, ValueError, struct.error) as e:
            raise UserError(f"{prefix}.idx: not a readable Megatron indexed dataset ({e or type(e).__name__})") from None
        index = self.ds.index
        self._dtype = np.dtype(index.dtype)
        lengths = index.sequence_lengths.astype(np.int64)
        pointers = index.sequence_pointers
        size = self._dtype.itemsize
        n = int(lengths.sum())
        expect = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * size if len(lengths) else np.zeros(0, np.int64)
        if not np.array_equal(pointers, expect) or os.path.getsize(bin_path) != n * size:
            raise UserError(
                f"{prefix}: the sequences of this Megatron dataset do not lie back to back in {bin_path} "
                f"({os.path.getsize(bin_path)} bytes, the index says {n} tokens x {size} bytes)"
            )
        if DType.code_from_dtype(index.dtype) not in (
            DType.uint8.value,
            DType.uint16.value,
            DType.int16.value,
            DType.int32.value,
            DType.int64.value,
        ):
            raise UserError(f"{prefix}: token dtype {self._dtype} is not an integer type")
        self._num_tokens = n
        self._tokens = self.ds.bin_reader.read(dtype=index.dtype, count=n, offset=0) if n else np.zeros(0, self._dtype)
        self._check(self._tokens[:CHECK_AT_OPEN], "the first tokens")

    def _check(self, ids: np.ndarray, where: str) -> None:
        if ids.size and (ids.min() < 0 or (self.vocab_limit is not None and ids.max() >= self.vocab_limit)):
            raise UserError(
                f"Megatron dataset {self.prefix}: {where} hold token id {int(ids.max() if ids.min() >= 0 else ids.min())}, "
                f"outside the model's vocabulary [0, {self.vocab_limit})"
            )

    @property
    def num_documents(self) -> int:
        return len(self.ds.document_indices) - 1

    def _check_windows(self, out: np.ndarray, idx: np.ndarray) -> None:
        self._check(out, f"windows {idx.tolist()[:4]}")

    def __repr__(self) -> str:
        return f"MegatronTokens({self.prefix!r}, tokens={self._num_tokens}, documents={self.num_documents})"


def open_dataset(prefix: str, vocab_limit: int | None = None):
    """The token dataset at PREFIX: megagrow's own format (TokenDataset) or a Megatron indexed
    dataset (MegatronTokens), told apart by the .idx magic."""
    if is_megatron(prefix):
        return MegatronTokens(prefix, vocab_limit)
    from megagrow.data.dataset import TokenDataset

    return TokenDataset(prefix)
