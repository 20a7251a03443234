"""The growth decision of a transition (megagrow.state.decision): made once, with one growth map,
and what the read plan, each rank's opened files and the regrow take from it."""

from __future__ import annotations

import pytest
from conftest import REPO

from megagrow.config import load_plan
from megagrow.errors import UserError
from megagrow.growth import ops
from megagrow.state.checkpoint import SourceCheckpoint
from megagrow.state.decision import decide, decide_for
from megagrow.state.reads import rank_source_files, read_plan
from megagrow.state.record import StageRecord

PLAN = f"{REPO}/recipes/staged_1b.yaml"  # s185m -depth-> s350m -width-> s1300m (TP=2 x DP=16, ZeRO-2)


def _source(plan, k: int) -> SourceCheckpoint:
    """Stage k-1 of `plan` at its own layout, as a planned (never written) checkpoint."""
    prev = plan.stages[k - 1]
    L = prev.layout
    return SourceCheckpoint.planned(prev.model, L.tp, L.dp, L.zero_stage, record=StageRecord(plan, k - 1))


@pytest.fixture
def counted(monkeypatch):
    """Counts every growth map built (megagrow.growth.ops.plan_growth) while the test runs."""
    calls = []
    real = ops.plan_growth

    def counting(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(ops, "plan_growth", counting)
    return calls


def test_one_transition_builds_its_growth_map_exactly_once(counted):
    """One regrow's read planning -- the decision, read_plan and every target rank's
    rank_source_files (what verify_reads asks each rank) -- builds the growth map exactly once."""
    plan = load_plan(PLAN)
    k = 2
    src = _source(plan, k)
    g = decide_for(plan, k, src)
    res = read_plan(plan, k, src, g)
    world = plan.stages[k].layout.world_size
    per_rank = [rank_source_files(plan, k, src, r, g) for r in range(world)]
    assert len(counted) == 1 and counted[0] == g.op
    # the per-rank files are read_plan's count (its metadata file + the optimizer files)
    assert [1 + len(f) for f in per_rank] == res["files_opened_per_rank"]
    assert res["op"] == g.describe()


def test_decision_fields_follow_the_stage(counted):
    """The decision: the stage's operator with its symmetry breaking; a source of stage k itself is
    the identity (same_stage, reading w, m, v); optimizer_state=reset reads only the weights and
    resets Adam, but never on a resharding (same stage)."""
    plan = load_plan(PLAN, ["stages.s1300m.growth.optimizer_state=reset", "stages.s1300m.growth.symmetry_breaking=0.5"])
    prev = plan.stages[1].model
    g = decide(plan, 2, prev)
    assert g.op == ops.Width(2, 0.5) and not g.same_stage and g.reset and g.states == ("w",)
    same = decide(plan, 2, plan.stages[2].model, same_stage=True)
    assert same.op == ops.Identity() and same.same_stage and not same.reset and same.states == ("w", "m", "v")
    moved = decide(load_plan(PLAN), 2, prev)
    assert not moved.reset and moved.states == ("w", "m", "v")
    assert set(g.tensors) == set(ops.logical_tensors(plan.stages[2].model))
    assert len(counted) == 3  # one map per decision


def test_decision_refuses_an_operator_that_does_not_reach_the_stage():
    """A spec that does not take the source's model to stage k's is one UserError (as validation and
    `megagrow regrow --grow` report it)."""
    plan = load_plan(PLAN)
    with pytest.raises(UserError, match="depth growth"):
        decide(plan, 2, plan.stages[1].model, spec="depth")


@pytest.mark.parametrize("stage, way", [("s350m", "into"), ("s185m", "from")])
def test_growth_into_or_from_a_zero0_stage_is_refused_in_one_line(stage, way):
    """Property: a transition whose target, or whose source stage, has zero_stage 0 is refused by the
    decision itself (so `megagrow run`'s plan check, the trainer's transition and regrow all refuse it),
    as one UserError naming the stage; before, regrow into ZeRO-0 died in the engine fill with an
    AttributeError traceback on every rank. The reshard of a ZeRO-0 stage into itself is refused too."""
    plan = load_plan(PLAN, [f"stages.{stage}.layout.zero_stage=0", f"stages.{stage}.layout.tp=1"])
    with pytest.raises(UserError, match=f"stage '{stage}' has zero_stage 0: growing or resharding {way} a ZeRO-0 stage"):
        decide(plan, 1, plan.stages[0].model)
    k = [s.name for s in plan.stages].index(stage)
    with pytest.raises(UserError, match="zero_stage 0"):
        decide(plan, k, plan.stages[k].model, same_stage=True)
