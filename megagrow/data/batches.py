"""The micro-batches of one step for one data-parallel rank, cut from the global sample stream.

A step with global batch B takes global samples [first, first + B); DP rank r's micro-step j
takes its own slice of them (`rank_slice`), so the same step trains on the same samples at any
DP size. Dropout masks are seeded from (plan seed, global sample index): a resumed run draws
the same masks without saving any RNG state.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from megagrow.config import Plan, Stage
from megagrow.errors import UserError


def dropout_seed(seed: int, global_index: int) -> int:
    """Dropout masks are a function of (plan seed, data position): identical on resume."""
    return zlib.crc32(f"{seed}:{global_index}".encode())


@dataclass
class Batches:
    """Micro-batches of the global sample stream for this DP rank."""

    dataset: object
    sampler: object
    seq_len: int
    stage: Stage
    dp_rank: int
    dp_size: int

    @classmethod
    def open(cls, plan: Plan, stage: Stage, dp_rank: int, dp_size: int) -> Batches:
        from megagrow.data.megatron import open_dataset
        from megagrow.data.sampler import GlobalSampler

        m = stage.model
        ds = open_dataset(plan.data.prefix, vocab_limit=m.vocab_size)  # megagrow's format or Megatron's
        if ds.vocab_size is not None and ds.vocab_size > m.vocab_size:
            raise UserError(f"dataset {plan.data.prefix} has vocab {ds.vocab_size} > model vocab_size {m.vocab_size}")
        n = ds.num_windows(m.seq_len)
        if n < 1:
            raise UserError(f"dataset {plan.data.prefix} is shorter than one sequence of {m.seq_len + 1} tokens")
        return cls(ds, GlobalSampler(n, plan.seed), m.seq_len, stage, dp_rank, dp_size)

    def micro(self, first_sample: int, micro_step: int, device):
        """(tokens, targets, global index of its first sample) for one micro-step of one step
        whose global batch starts at global sample index `first_sample`."""
        import torch

        from megagrow.data.sampler import rank_slice

        L = self.stage.layout
        lo, hi = rank_slice(L.global_batch, self.dp_size, self.dp_rank, L.micro_batch, L.grad_accum, micro_step)
        rows = self.dataset.windows(self.sampler.indices(first_sample + lo, first_sample + hi), self.seq_len)
        x = torch.from_numpy(rows).to(device)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous(), first_sample + lo
