"""The data position is a global sample index, independent of the data-parallel layout.

Global sample ``g = 0, 1, 2, ...`` is window ``perm_e[g % n]`` of the dataset, where ``n`` is
the number of windows, ``e = g // n`` the epoch and
``perm_e = np.random.Generator(np.random.PCG64([seed, e])).permutation(n)``: every window
exactly once per epoch, a fresh order each epoch, all a pure function of ``(seed, g)``.

Optimizer step ``s`` with global batch ``B`` consumes global samples ``[s*B, (s+1)*B)``; the
sample at position ``p`` of the step's global batch is global sample ``s*B + p``.

Layout of a global batch over data-parallel ranks and gradient-accumulation micro-steps
(``B == dp_size * micro_batch * grad_accum``)::

    position p = (micro_step * dp_size + dp_rank) * micro_batch + k,   0 <= k < micro_batch

i.e. micro-step ``j`` takes the contiguous block ``[j*dp*mb, (j+1)*dp*mb)`` and splits it among
the ranks in rank order. Example, B = 8, dp = 2, mb = 2, ga = 2::

    position   0  1 | 2  3 | 4  5 | 6  7
    taken by   r0 j0| r1 j0| r0 j1| r1 j1

Whatever ``(dp, mb, ga)``, the ranks' micro-steps of one step together take every position of
``[0, B)`` exactly once, so a step sees the same samples at any DP size: a run can change its
DP size (or micro batch) between stages and resume at the same global sample index
``step * B``. (Only the float summation order of the gradient changes.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from megagrow.data.dataset import TokenDataset


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class GlobalSampler:
    """Maps a global sample index to a window id: deterministic in ``(seed, index)``."""

    def __init__(self, num_windows: int, seed: int):
        self.num_windows = _check_int("num_windows", num_windows, 1)
        self.seed = _check_int("seed", seed, 0)
        self._cache: dict[int, np.ndarray] = {}  # the last two epochs' permutations

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the windows in ``epoch``: int64 [num_windows], read-only."""
        epoch = _check_int("epoch", epoch, 0)
        perm = self._cache.get(epoch)
        if perm is None:
            perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_windows).astype(np.int64, copy=False)
            perm.flags.writeable = False
            if len(self._cache) >= 2:  # a batch can straddle two epochs; keep both
                self._cache.pop(min(self._cache))
            self._cache[epoch] = perm
        return perm

    def window_of(self, g: int) -> int:
        """Window id of global sample ``g``: ``permutation(g // n)[g % n]``."""
        g = _check_int("g", g, 0)
        return int(self.permutation(g // self.num_windows)[g % self.num_windows])

    def indices(self, start: int, stop: int) -> np.ndarray:
        """Window ids of global samples ``[start, stop)``: int64 [stop - start]."""
        start = _check_int("start", start, 0)
        stop = _check_int("stop", stop, start)
        n = self.num_windows
        out = np.empty(stop - start, dtype=np.int64)
        g = start
        while g < stop:
            epoch, pos = divmod(g, n)
            take = min(stop - g, n - pos)
            out[g - start : g - start + take] = self.permutation(epoch)[pos : pos + take]
            g += take
        return out

    def batch_indices(self, step: int, global_batch: int) -> np.ndarray:
        """Window ids of step ``step``'s global batch: global samples ``[step*B, (step+1)*B)``."""
        step = _check_int("step", step, 0)
        global_batch = _check_int("global_batch", global_batch, 1)
        return self.indices(step * global_batch, (step + 1) * global_batch)

    def __repr__(self) -> str:
        return f"GlobalSampler(num_windows={self.num_windows}, seed={self.seed})"


def rank_slice(global_batch: int, dp_size: int, dp_rank: int, micro_batch: int, grad_accum: int, micro_step: int) -> tuple[int, int]:
    """Positions ``[start, stop)`` of the global batch that ``dp_rank`` takes at ``micro_step``.

    ``start = (micro_step * dp_size + dp_rank) * micro_batch``, ``stop = start + micro_batch``
    (layout in the module docstring). Raises ValueError unless
    ``global_batch == dp_size * micro_batch * grad_accum`` and rank / micro-step are in range.
    """
    global_batch = _check_int("global_batch", global_batch, 1)
    dp_size = _check_int("dp_size", dp_size, 1)
    micro_batch = _check_int("micro_batch", micro_batch, 1)
    grad_accum = _check_int("grad_accum", grad_accum, 1)
    dp_rank = _check_int("dp_rank", dp_rank, 0)
    micro_step = _check_int("micro_step", micro_step, 0)
    if global_batch != dp_size * micro_batch * grad_accum:
        raise ValueError(
            f"global_batch ({global_batch}) must equal dp_size ({dp_size}) x "
            f"micro_batch ({micro_batch}) x grad_accum ({grad_accum}) = "
            f"{dp_size * micro_batch * grad_accum}"
        )
    if dp_rank >= dp_size:
        raise ValueError(f"dp_rank {dp_rank} out of range [0, {dp_size})")
    if micro_step >= grad_accum:
        raise ValueError(f"micro_step {micro_step} out of range [0, {grad_accum})")
    start = (micro_step * dp_size + dp_rank) * micro_batch
    return start, start + micro_batch


def get_batch(
    dataset: TokenDataset,
    sampler: GlobalSampler,
    seq_len: int,
    step: int,
    global_batch: int,
    dp_size: int,
    dp_rank: int,
    micro_batch: int,
    grad_accum: int,
    micro_step: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One rank's micro-batch of step ``step``.

    Returns ``(tokens, targets, first_global_index)``: LongTensors [micro_batch, seq_len] with
    ``tokens[k] = window[:-1]`` and ``targets[k] = window[1:]`` of the window of global sample
    ``first_global_index + k``, where ``first_global_index = step * global_batch + start`` and
    ``start`` is ``rank_slice(...)[0]``.
    """
    import torch  # here, so that the data-preparation CLI does not pay for importing torch

    seq_len = _check_int("seq_len", seq_len, 1)
    step = _check_int("step", step, 0)
    start, stop = rank_slice(global_batch, dp_size, dp_rank, micro_batch, grad_accum, micro_step)
    available = dataset.num_windows(seq_len)
    if sampler.num_windows > available:
        raise ValueError(
            f"the sampler draws from {sampler.num_windows} windows but {dataset.prefix} has only {available} windows of seq_len {seq_len}"
        )
    first = step * global_batch + start
    windows = dataset.windows(sampler.indices(first, first + (stop - start)), seq_len)
    tokens = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    targets = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    return tokens, targets, first
