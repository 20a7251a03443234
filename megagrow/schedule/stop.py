"""A stage's stop rule inside the training loop: `stop: {rule: slope, ...}` in a plan.

Which loss.  The rule watches the validation loss when the stage evaluates (the trainer passes
`use_eval=True` when the stage config sets `eval_every` > 0 and the data has a held-out split,
and feeds each periodic eval to `update_eval`), else the logged training loss (`use_eval=False`,
the default).  Validation points are the periodic eval records of log.jsonl ({"stage", "step",
"eval_loss", "at": "periodic", ...}; the evals at a stage end and around a growth are not
decisions and are skipped, so a replay after a resume sees what the loop saw), training points
the training records ({"stage", "step", "loss", ...}); each kind is ignored in the other mode.  The per-batch training loss is noisy, which the rule's spike
filter and median fit (megagrow.schedule.slope) tolerate but the validation curve does not
need.

`StageStop.update(step, loss)` takes a training point, `update_eval(step, eval_loss)` a
validation point, `observe(record)` either from a log record; each returns True when the stage
should end at that step (the first point at step >= `min_steps` at which the rule fires);
`steps` stays the upper bound.  The decision is a function of losses every rank has (the
training loss is all-reduced, the eval loss too), so all ranks stop at the same step without
another collective; after a resume the rule is rebuilt by replaying log.jsonl up to the
checkpoint's step, so an interrupted stage stops where an uninterrupted one would.

Compute (documented choice): C = 6 x N x T, N the stage's non-embedding parameters and T the
tokens at the model's schedule position, (lr_offset + step) x global batch x seq_len. For the
first stage that is the compute spent so far (the paper's curve); a grown model counts from its
equivalent step S_small / c (megagrow.state.executor.lr_placement), i.e. it is placed on the
curve of a model of its size trained from scratch, which is what the thresholds are fitted on.
A point at compute 0 (an eval right after a growth whose schedule restarts at 0) is skipped.
Default thresholds: the paper's value for the next stage's operator (width -0.0475, depth
-0.0575), for the last stage the stop value -0.052.
"""

from __future__ import annotations

from megagrow.config import Plan
from megagrow.fsutil import read_records
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
    """The slope rule of stage k, fed one logged point at a time (validation or training loss)."""

    def __init__(self, plan: Plan, k: int, lr_offset: int = 0, use_eval: bool = False):
        stage = plan.stages[k]
        self.stage, self.lr_offset = stage, lr_offset
        self.use_eval = bool(use_eval)
        self.threshold = slope_threshold(plan, k)
        s = stage.stop
        self.rule = SlopeRule(self.threshold, window=s.window, ema=s.ema, patience=s.patience, spike_tol=s.spike_tol, estimator=s.estimator)
        self.flops_per_step = 6.0 * stage.model.num_params(embeddings=False) * stage.layout.global_batch * stage.model.seq_len
        self.last_step: int | None = None

    @property
    def source(self) -> str:
        """The loss the rule watches: "eval_loss" or "loss"."""
        return "eval_loss" if self.use_eval else "loss"

    @classmethod
    def of(
        cls, plan: Plan, k: int, lr_offset: int = 0, log_path: str | None = None, upto: int = 0, use_eval: bool = False
    ) -> StageStop | None:
        """The stage's rule (None for rule "steps"), with the logged points up to step `upto` replayed."""
        if plan.stages[k].stop.rule != "slope":
            return None
        rule = cls(plan, k, lr_offset, use_eval)
        if log_path and upto > 0:
            rule.replay(log_path, upto)
        return rule

    def compute(self, step: int) -> float:
        return self.flops_per_step * (self.lr_offset + step)

    def _feed(self, step: int, loss: float) -> bool:
        """Points before `min_steps` fill the window but cannot fire the rule (the slope of a loss
        curve is shallow during warm-up, and SlopeRule stays fired once it has fired). A step
        already fed (an eval at the stage end that repeats a periodic one) is not fed again."""
        if self.compute(step) <= 0 or (self.last_step is not None and step <= self.last_step):
            return False
        self.last_step = step
        fired = self.rule.update(self.compute(step), loss)
        if step < self.stage.stop.min_steps:
            self.rule.fired_at = None
            return False
        return fired

    def update(self, step: int, loss: float) -> bool:
        """A training-loss point logged at `step`; True when the stage should end here. Ignored
        (False) when the rule watches the validation loss."""
        return False if self.use_eval else self._feed(step, loss)

    def update_eval(self, step: int, eval_loss: float) -> bool:
        """A validation-loss point at `step`; True when the stage should end here. Ignored (False)
        when the rule watches the training loss."""
        return self._feed(step, eval_loss) if self.use_eval else False

    def observe(self, record: dict) -> bool:
        """A log.jsonl record of this stage (training or eval); True when the stage should end."""
        if record.get("stage", self.stage.name) != self.stage.name:
            return False
        if "eval_loss" in record:
            if record.get("at", "periodic") != "periodic":
                return False
            return self.update_eval(int(record["step"]), float(record["eval_loss"]))
        if "loss" in record:
            return self.update(int(record["step"]), float(record["loss"]))
        return False

    def replay(self, log_path: str, upto: int) -> None:
        """Feed the points this stage logged up to step `upto`, in step order (a step logged
        twice, after a restart from an older checkpoint, counts once: its last record)."""
        points: dict[int, float] = {}
        key = self.source
        for r in read_records(log_path):
            if (
                r.get("stage", self.stage.name) == self.stage.name
                and key in r
                and 0 <= r["step"] <= upto
                and (key == "loss" or r.get("at", "periodic") == "periodic")
            ):
                points[int(r["step"])] = float(r[key])
        for step in sorted(points):
            self._feed(step, points[step])
