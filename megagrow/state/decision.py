"""The growth decision of one transition (or regrow): which operator takes the source's model to
stage k's, its growth map, and what of the source's optimizer state the fill reads.

`decide` builds it once (one `plan_growth`); the regrow, its read plan, its verification and the
offline writer all take the same `Growth`, so the map is never rebuilt within one transition.
"""

from __future__ import annotations

from dataclasses import dataclass

from megagrow.config import Plan
from megagrow.errors import UserError


@dataclass(frozen=True)
class Growth:
    """One transition's decision. op: the operator; tensors: its growth map ({name: TensorMap});
    same_stage: the source is stage k itself (pure resharding: the identity); reset: the Adam
    moments are written as zeros and the step as 0 (stage.growth.optimizer_state "reset");
    states: the source states the fill reads ("w" alone under reset, else "w", "m", "v")."""

    op: object
    tensors: dict
    same_stage: bool
    reset: bool

    @property
    def states(self) -> tuple:
        return ("w",) if self.reset else ("w", "m", "v")

    def describe(self) -> str:
        return self.op.describe() if hasattr(self.op, "describe") else str(self.op)


def decide(plan: Plan, k: int, src_model, spec: str | None = None, same_stage: bool = False) -> Growth:
    """The growth into stage k of `plan` from a checkpoint of model `src_model`: of stage k itself
    (same_stage: the identity, a resharding) or of stage k-1 with operator `spec` (default: the
    stage's `grow`, else the identity), with the stage's symmetry breaking and optimizer-state
    knobs. Raises UserError when the operator does not take `src_model` to stage k's model."""
    from megagrow.growth.ops import growth_between

    stage = plan.stages[k]
    _need_zero(stage, "into")
    if k > 0 and not same_stage:
        _need_zero(plan.stages[k - 1], "from")
    name = "identity" if same_stage else (spec or stage.grow or "identity")
    op, gp = growth_between(name, src_model, stage.model, symmetry_breaking=stage.growth.symmetry_breaking)
    reset = not same_stage and stage.growth.optimizer_state == "reset"  # stage.growth: the plan's ablation knobs
    return Growth(op, gp.tensors, same_stage, reset)


def _need_zero(stage, way: str) -> None:
    """Growth and resharding read and write ZeRO's flat fp32 partitions: stages 1-3. A ZeRO-0 checkpoint
    keeps Adam's state in torch's own per-parameter state dict, which neither the shard reader nor the
    writer addresses."""
    if stage.layout.zero_stage == 0:
        raise UserError(
            f"stage {stage.name!r} has zero_stage 0: growing or resharding {way} a ZeRO-0 stage is not supported "
            "(its optimizer state is not in ZeRO's flat partitions); use zero_stage 1 (at dp 1 it partitions nothing, as ZeRO-0)"
        )


def decide_for(plan: Plan, k: int, src, spec: str | None = None) -> Growth:
    """`decide` for source checkpoint `src` (a `SourceCheckpoint`, real or planned): whether it is
    stage k itself or stage k-1 is judged by `check_source`."""
    return decide(plan, k, src.model, spec, same_stage=check_source(plan, k, src))


def check_source(plan: Plan, k: int, src) -> bool:
    """The source must be stage k itself (pure resharding: returns True) or stage k-1 of this
    plan (growth into stage k: returns False), judged by stage name and model config."""
    stage = plan.stages[k]
    name, model = src.record.stage.name, src.model
    if name == stage.name and model == stage.model:
        return True
    if k > 0 and name == plan.stages[k - 1].name and model == plan.stages[k - 1].model:
        return False
    prev = f" or stage {k - 1} ({plan.stages[k - 1].name!r})" if k > 0 else ""
    raise UserError(
        f"source checkpoint is of stage {name!r} ({_short(model)}); stage {k} ({stage.name!r}) of plan "
        f"{plan.name!r} takes a checkpoint of stage {k} itself{prev} with the model the plan gives it"
    )


def _short(m) -> str:
    return f"{m.flavour} L={m.n_layers} d={m.d_model} H={m.n_heads}"
