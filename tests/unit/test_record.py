"""The stage record: one typed, versioned record of a stage's state in every checkpoint."""

from __future__ import annotations

import os

import pytest
from conftest import REPO

from megagrow.config import load_plan
from megagrow.errors import UserError
from megagrow.state.record import RECORD_VERSION, StageRecord

PLAN = load_plan(os.path.join(REPO, "recipes", "tiny_test.yaml"))


def test_round_trip_keeps_every_field():
    """to_client_state -> from_client_state gives an equal record (every field, the plan included)."""
    rec = StageRecord(
        PLAN,
        1,
        step=7,
        sample_offset=128,
        lr_offset=9,
        rewarmup=2,
        final_step=7,
        loss=3.5,
        tokens_offset=4096,
        flops_offset=10**15,
        eval_loss=3.7,
    )
    cs = rec.to_client_state()
    assert cs["record_version"] == RECORD_VERSION and cs["sample_index"] == 128 + 7 * 8
    assert StageRecord.from_client_state(cs) == rec


def test_reshard_keeps_every_field_and_growth_continues_the_data_stream():
    """resharded(): the same stage, every field kept (final_step too); grown(): step 0 of the next stage at the
    source's sample index, with the given LR placement and no final step."""
    rec = StageRecord(PLAN, 0, step=10, sample_offset=0, lr_offset=0, rewarmup=0, final_step=10, loss=4.0)
    assert rec.resharded(PLAN, 0) == rec and rec.finished
    g = rec.grown(PLAN, 1, lr_offset=5, rewarmup=2)
    assert (g.index, g.step, g.sample_offset, g.lr_offset, g.rewarmup, g.final_step) == (1, 0, 80, 5, 2, None)
    assert not g.finished and g.end_step == PLAN.stages[1].steps


def test_ledger_continues_over_growth():
    """grown(): the next stage's step 0 starts the FLOP ledger at the source's cumulative tokens and FLOPs
    (the source's own offsets included), and carries its final eval loss (the value before growth)."""
    from megagrow.metrics.flops import flops_per_token

    s0, s1 = PLAN.stages[0], PLAN.stages[1]
    rec = StageRecord(PLAN, 0, step=10, tokens_offset=500, flops_offset=7, eval_loss=4.25)
    tok0 = s0.layout.global_batch * s0.model.seq_len
    assert rec.tokens == 500 + 10 * tok0 and rec.flops == 7 + 10 * tok0 * flops_per_token(s0.model)
    g = rec.grown(PLAN, 1, lr_offset=5, rewarmup=2)
    assert (g.tokens, g.flops, g.eval_loss) == (rec.tokens, rec.flops, 4.25)
    tok1 = s1.layout.global_batch * s1.model.seq_len
    assert g.replace(step=3).flops == rec.flops + 3 * tok1 * flops_per_token(s1.model)
    old = {k: v for k, v in rec.to_client_state().items() if k not in ("tokens_offset", "flops_offset", "eval_loss")}
    assert StageRecord.from_client_state(old).flops_offset == 0  # checkpoints from before the ledger still load


def test_bad_records_are_user_errors():
    """A missing key, a newer format or another stage/model/layout: one clear UserError."""
    cs = StageRecord(PLAN, 0).to_client_state()
    with pytest.raises(UserError, match="incomplete"):
        StageRecord.from_client_state({k: v for k, v in cs.items() if k != "lr_offset"})
    with pytest.raises(UserError, match="newer"):
        StageRecord.from_client_state(dict(cs, record_version=RECORD_VERSION + 1))
    with pytest.raises(UserError, match="not a megagrow checkpoint"):
        StageRecord.from_client_state({"module": None})
    rec = StageRecord(PLAN, 0)
    rec.check_resumes(PLAN, 0)
    with pytest.raises(UserError, match="not of stage 'wide'"):
        rec.check_resumes(PLAN, 1)
