"""The one record of a stage's state that every checkpoint carries besides DeepSpeed's own.

Written by every save (training, transition, regrow), read by every resume, transition and
regrow. It is stored as flat keys of DeepSpeed's client state (so DeepSpeed's tools and
`torch.load` show it plainly), with a format version. `StageRecord.resharded` (same stage, new
layout) keeps every field; `StageRecord.grown` starts the next stage where this one ended.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megagrow import __version__
from megagrow.config import Plan, Stage
from megagrow.errors import UserError

RECORD_VERSION = 1


@dataclass(frozen=True)
class StageRecord:
    plan: Plan
    index: int  # which stage of `plan`
    step: int = 0
    sample_offset: int = 0  # global sample index of this stage's step 0 (carried over growth)
    lr_offset: int = 0  # schedule position of step 0 (the grown model's equivalent step)
    rewarmup: int = 0  # re-warmup steps after growth
    final_step: int | None = None  # the step a stop rule ended the stage at (None: it ends at `steps`)
    loss: float | None = None  # the last training loss (for display)
    # the FLOP ledger: cumulative training tokens and FLOPs of the whole run at this stage's step 0
    # (earlier stages included; carried over growth, like sample_offset)
    tokens_offset: int = 0
    flops_offset: int = 0
    eval_loss: float | None = None  # the latest eval loss (at a grown stage's step 0: the source's final one)

    @property
    def stage(self) -> Stage:
        return self.plan.stages[self.index]

    @property
    def sample_index(self) -> int:
        """The global sample index of the next step's first sample."""
        return self.sample_offset + self.step * self.stage.layout.global_batch

    @property
    def tokens(self) -> int:
        """Cumulative training tokens of the run after `step` steps of this stage."""
        from megagrow.metrics.flops import Ledger

        return Ledger.of(self.stage, self.tokens_offset, self.flops_offset).tokens(self.step)

    @property
    def flops(self) -> int:
        """Cumulative training FLOPs of the run (megagrow/metrics/flops.py's convention) after `step` steps."""
        from megagrow.metrics.flops import Ledger

        return Ledger.of(self.stage, self.tokens_offset, self.flops_offset).flops(self.step)

    @property
    def end_step(self) -> int:
        """The step the stage ends at: its `steps`, or earlier where a stop rule ended it."""
        return self.stage.steps if self.final_step is None else self.final_step

    @property
    def finished(self) -> bool:
        return self.step >= self.end_step

    def replace(self, **kw) -> StageRecord:
        return dataclasses.replace(self, **kw)

    # ---------------------------------------------------------------- transitions
    def resharded(self, plan: Plan, index: int) -> StageRecord:
        """The same stage at the layout `plan` gives it: every field kept."""
        return self.replace(plan=plan, index=index)

    def grown(self, plan: Plan, index: int, lr_offset: int, rewarmup: int) -> StageRecord:
        """Step 0 of the next stage: it continues the data stream and the FLOP ledger where this one ended."""
        return StageRecord(
            plan,
            index,
            step=0,
            sample_offset=self.sample_index,
            lr_offset=lr_offset,
            rewarmup=rewarmup,
            loss=self.loss,
            tokens_offset=self.tokens,
            flops_offset=self.flops,
            eval_loss=self.eval_loss,
        )

    # ---------------------------------------------------------------- storage
    def to_client_state(self) -> dict:
        return {
            "record_version": RECORD_VERSION,
            "megagrow_version": __version__,
            "plan": self.plan.to_dict(),
            "stage_index": self.index,
            "stage": self.stage.to_dict(),
            "step": self.step,
            "sample_offset": self.sample_offset,
            "sample_index": self.sample_index,  # derived; recorded for readers of the raw file
            "lr_offset": self.lr_offset,
            "rewarmup": self.rewarmup,
            "final_step": self.final_step,
            "loss": self.loss,
            "tokens_offset": self.tokens_offset,
            "flops_offset": self.flops_offset,
            "tokens": self.tokens,  # derived, for readers of the raw file
            "flops": self.flops,
            "eval_loss": self.eval_loss,
        }

    @classmethod
    def from_client_state(cls, cs: dict, where: str = "checkpoint") -> StageRecord:
        if not isinstance(cs, dict) or "stage" not in cs or "plan" not in cs:
            raise UserError(f"{where}: not a megagrow checkpoint (no stage record)")
        version = cs.get("record_version", 1)
        if not isinstance(version, int) or version > RECORD_VERSION:
            raise UserError(
                f"{where}: stage record format {version!r} is newer than this megagrow reads ({RECORD_VERSION}); upgrade megagrow"
            )
        try:
            plan = Plan.from_dict(cs["plan"], f"{where} plan")
            index = int(cs["stage_index"])
            if not 0 <= index < len(plan.stages):
                raise ValueError(f"stage_index {index} outside the plan's {len(plan.stages)} stages")
            return cls(
                plan,
                index,
                step=int(cs["step"]),
                sample_offset=int(cs["sample_offset"]),
                lr_offset=int(cs["lr_offset"]),
                rewarmup=int(cs["rewarmup"]),
                final_step=None if cs.get("final_step") is None else int(cs["final_step"]),
                loss=cs.get("loss"),
                # absent in checkpoints written before the ledger: the run's count starts at 0 there
                tokens_offset=int(cs.get("tokens_offset", 0)),
                flops_offset=int(cs.get("flops_offset", 0)),
                eval_loss=cs.get("eval_loss"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: stage record is incomplete or malformed ({type(e).__name__}: {e})") from None

    # ---------------------------------------------------------------- checks
    def check_resumes(self, plan: Plan, index: int) -> None:
        """This record resumes stage `index` of `plan` only with the same model and the same layout."""
        stage, mine = plan.stages[index], self.stage
        if mine.name != stage.name:
            raise UserError(f"checkpoint is of stage {mine.name!r}, not of stage {stage.name!r}; refusing to resume")
        if mine.model != stage.model:
            raise UserError(f"checkpoint of stage {stage.name!r} was written for another model config; refusing to resume")
        if mine.layout != stage.layout:
            raise UserError(
                f"checkpoint of stage {stage.name!r} was written at layout {mine.layout.to_dict()}, this run uses "
                f"{stage.layout.to_dict()}: reshard it with tools/regrow.py"
            )
