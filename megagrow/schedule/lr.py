"""Learning-rate schedules: linear warmup, then cosine / linear decay to min_lr, or constant.

The LR is a pure function of the optimizer step, so a resumed run needs nothing but the
step. Growth (megagrow.growth) places a grown model on this curve at an equivalent step
with a short re-warmup; that is expressed with `offset` and `rewarmup_steps` here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megagrow.config import OptimConfig


@dataclass(frozen=True)
class LRSchedule:
    peak: float
    min_lr: float
    warmup: int
    decay: int  # steps from 0 until min_lr is reached (warmup included)
    kind: str = "cosine"
    offset: int = 0  # schedule position of this stage's step 0 (equivalent step after growth)
    rewarmup: int = 0  # linear ramp from rewarmup_from to the schedule over this many steps
    rewarmup_from: float = 0.0

    @classmethod
    def from_optim(cls, o: OptimConfig, stage_steps: int, offset: int = 0, rewarmup: int = 0, rewarmup_from: float = 0.0) -> LRSchedule:
        # decay_steps is a schedule position; by default the schedule ends with the stage
        return cls(o.lr, o.min_lr, o.warmup_steps, o.decay_steps or offset + stage_steps, o.schedule, offset, rewarmup, rewarmup_from)

    def base(self, pos: int) -> float:
        """The schedule at absolute position `pos` (no re-warmup)."""
        if pos < self.warmup:
            return self.peak * (pos + 1) / self.warmup
        if self.kind == "constant":
            return self.peak
        frac = min(1.0, (pos - self.warmup) / max(1, self.decay - self.warmup))
        if self.kind == "linear":
            return self.peak - (self.peak - self.min_lr) * frac
        return self.min_lr + 0.5 * (self.peak - self.min_lr) * (1 + math.cos(math.pi * frac))

    def __call__(self, step: int) -> float:
        lr = self.base(self.offset + step)
        if step < self.rewarmup:
            t = (step + 1) / self.rewarmup
            target = self.base(self.offset + self.rewarmup)
            lr = self.rewarmup_from + (target - self.rewarmup_from) * t
        return lr
