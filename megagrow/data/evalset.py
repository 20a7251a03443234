"""The held-out windows an eval reads: a fixed list, the same under every layout.

The validation split of dataset PREFIX is PREFIX.valid.bin/.idx (tools/prepare_data.py writes
it; whole documents never trained on). An eval at sequence length s reads n windows of s + 1
tokens (the same window shape as training), n = min(ceil(eval_tokens / s), windows available),
spread evenly over the whole split: window ids ``(i * available) // n`` for i < n. The list
depends only on (the split, s, eval_tokens), not on TP, DP, ZeRO stage or micro batch, so the
eval loss - the mean next-token loss over all n x s targets - is the same number at every
layout up to float rounding.

Work is divided in rounds: in round j, DP rank r reads windows [(j*dp + r)*b, +b) of the list
(b the micro batch). Every rank runs the same number of rounds (ZeRO-3 gathers parameters
collectively in each forward); a rank with nothing left in the last round runs a placeholder
forward whose loss is not counted.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from megagrow.data.dataset import TokenDataset, has_valid_split, valid_prefix
from megagrow.errors import UserError


@dataclass
class EvalSet:
    dataset: TokenDataset
    seq_len: int
    window_ids: np.ndarray  # int64 [n], ascending

    @classmethod
    def open(cls, prefix: str, seq_len: int, eval_tokens: int, vocab_size: int) -> tuple[EvalSet | None, str]:
        """(the eval set, "") or (None, why there is none): no split beside `prefix` (data prepared
        before splits existed, or with --valid-fraction 0), or eval_tokens == 0."""
        if eval_tokens <= 0:
            return None, "eval_tokens is 0"
        if not has_valid_split(prefix):
            return None, (
                f"no validation split {valid_prefix(prefix)}.bin/.idx beside the dataset (re-run "
                "tools/prepare_data.py, default --valid-fraction 0.005)"
            )
        from megagrow.data.megatron import open_dataset

        ds = open_dataset(valid_prefix(prefix), vocab_limit=vocab_size)  # megagrow's format or Megatron's
        if ds.vocab_size is not None and ds.vocab_size > vocab_size:
            raise UserError(f"validation split {ds.prefix} has vocab {ds.vocab_size} > model vocab_size {vocab_size}")
        avail = ds.num_windows(seq_len)
        if avail < 1:
            return None, f"validation split {ds.prefix} is shorter than one window of {seq_len + 1} tokens"
        n = min(math.ceil(eval_tokens / seq_len), avail)
        ids = (np.arange(n, dtype=np.int64) * avail) // n
        return cls(ds, seq_len, ids), ""

    @property
    def num_windows(self) -> int:
        return len(self.window_ids)

    @property
    def num_tokens(self) -> int:
        """Targets the eval loss averages over."""
        return self.num_windows * self.seq_len

    @property
    def key(self) -> dict:
        """What identifies the list: two evals compare only if their keys are equal."""
        return {
            "valid": os.path.basename(self.dataset.prefix),
            "seq_len": self.seq_len,
            "windows": self.num_windows,
            "valid_tokens": self.dataset.num_tokens,
        }

    def rounds(self, dp_rank: int, dp_size: int, batch: int) -> list[tuple[np.ndarray, bool]]:
        """This rank's reads: [(window ids, counted)], the same length on every rank."""
        n = self.num_windows
        per_round = dp_size * batch
        out = []
        for j in range(math.ceil(n / per_round)):
            lo = (j * dp_size + dp_rank) * batch
            hi = min(lo + batch, n)
            if lo < n:
                out.append((self.window_ids[lo:hi], True))
            else:
                out.append((self.window_ids[:1], False))  # placeholder: keeps the collectives in step
        return out

    def windows(self, ids: np.ndarray) -> np.ndarray:
        """int64 [len(ids), seq_len + 1]."""
        return self.dataset.windows(ids, self.seq_len)
