"""A stage's stop rule inside the training loop: `stop: {rule: slope, ...}` in a plan.

The trainer feeds every logged point (the steps it writes to log.jsonl) to
`megagrow.schedule.slope.SlopeRule` as (compute, loss); the first logged step >= `min_steps` at
which the rule fires ends the stage (saved as done; the controller grows the next stage from
it); `steps` stays the upper bound. The decision is a function of the logged losses only, which every rank has (the loss
is all-reduced), so all ranks stop at the same step without another collective; after a resume
the rule is rebuilt by replaying log.jsonl up to the checkpoint's step, so an interrupted stage
stops where an uninterrupted one would.

Compute (documented choice): C = 6 x N x T, N the stage's non-embedding parameters and T the
tokens at the model's schedule position, (lr_offset + step) x global batch x seq_len. For the
first stage that is the compute spent so far (the paper's curve); a grown model counts from its
equivalent step S_small / c (megagrow.state.executor.lr_placement), i.e. it is placed on the
curve of a model of its size trained from scratch, which is what the thresholds are fitted on.
Default thresholds: the paper's value for the next stage's operator (width -0.0475, depth
-0.0575), for the last stage the stop value -0.052.
"""

from __future__ import annotations

import json
import os

from megagrow.config import Plan
from megagrow.schedule.slope import SlopeRule, threshold_for


def slope_threshold(plan: Plan, k: int) -> float:
    stage = plan.stages[k]
    if stage.stop.threshold is not None:
        return float(stage.stop.threshold)
    if k + 1 < len(plan.stages):
        kind = (plan.stages[k + 1].grow or "").split(":")[0]
        if kind in ("width", "depth"):
            return threshold_for(kind)
    return threshold_for("stop")


class StageStop:
    """The slope rule of stage k, fed one logged (step, loss) at a time."""

    def __init__(self, plan: Plan, k: int, lr_offset: int = 0):
        stage = plan.stages[k]
        self.stage, self.lr_offset = stage, lr_offset
        self.threshold = slope_threshold(plan, k)
        s = stage.stop
        self.rule = SlopeRule(self.threshold, window=s.window, ema=s.ema, patience=s.patience)
        self.flops_per_step = 6.0 * stage.model.num_params(embeddings=False) * stage.layout.global_batch * stage.model.seq_len

    @classmethod
    def of(cls, plan: Plan, k: int, lr_offset: int = 0, log_path: str | None = None, upto: int = 0) -> "StageStop | None":
        """The stage's rule (None for rule "steps"), with the logged points up to step `upto` replayed."""
        if plan.stages[k].stop.rule != "slope":
            return None
        rule = cls(plan, k, lr_offset)
        if log_path and upto > 0:
            rule.replay(log_path, upto)
        return rule

    def compute(self, step: int) -> float:
        return self.flops_per_step * (self.lr_offset + step)

    def update(self, step: int, loss: float) -> bool:
        """Add the point logged at `step`; True when the stage should end at this step. Points
        before `min_steps` fill the window but cannot fire the rule (the slope of a loss curve
        is shallow during warm-up, and SlopeRule stays fired once it has fired)."""
        fired = self.rule.update(self.compute(step), loss)
        if step < self.stage.stop.min_steps:
            self.rule.fired_at = None
            return False
        return fired

    def replay(self, log_path: str, upto: int) -> None:
        """Feed the points this stage logged up to step `upto` (a step logged twice, after a
        restart from an older checkpoint, counts once: its last record)."""
        points = {}
        if os.path.isfile(log_path):
            with open(log_path) as f:
                for line in f:
                    if not line.endswith("\n"):
                        continue  # a record cut short by a kill
                    r = json.loads(line)
                    if r.get("stage", self.stage.name) == self.stage.name and 0 < r["step"] <= upto:
                        points[r["step"]] = r["loss"]
        for step in sorted(points):
            self.rule.update(self.compute(step), points[step])
