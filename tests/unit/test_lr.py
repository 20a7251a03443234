"""LR schedule: a pure function of the step; growth places a stage at an offset with a re-warmup."""

from __future__ import annotations

import math

from megagrow.config import OptimConfig
from megagrow.schedule.lr import LRSchedule


def test_warmup_then_cosine_to_min():
    """Linear warmup reaches the peak at step warmup-1; cosine ends exactly at min_lr at decay_steps."""
    s = LRSchedule.from_optim(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10), stage_steps=110)
    assert math.isclose(s(0), 1e-4) and math.isclose(s(9), 1e-3)
    assert math.isclose(s(60), 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(s(110), 1e-4) and math.isclose(s(500), 1e-4)
    assert all(s(i) >= s(i + 1) for i in range(10, 200))


def test_grown_stage_continues_the_curve_from_its_offset():
    """With offset R the stage's step t sits at schedule position R + t; by default the schedule ends
    with the stage (decay = R + steps), so an offset never clips the decay."""
    o = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    s = LRSchedule.from_optim(o, stage_steps=100, offset=50)
    base = LRSchedule.from_optim(o, stage_steps=150)
    assert all(s(t) == base(50 + t) for t in range(100))
    assert s(99) > 1e-4 and math.isclose(s(100), 1e-4)


def test_rewarmup_ramps_linearly_into_the_schedule():
    """Re-warmup over W steps: linear from rewarmup_from to the schedule value at R + W, then the schedule."""
    o = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    s = LRSchedule.from_optim(o, stage_steps=200, offset=40, rewarmup=20)
    target = s.base(60)
    assert math.isclose(s(0), target / 20) and math.isclose(s(9), target / 2) and math.isclose(s(19), target)
    assert all(s(t) == s.base(40 + t) for t in range(20, 200))


def test_lr_placement_after_growth():
    """The grown stage's schedule offset: paper = source position / c (1.776 width, 1.412 depth), keep = the
    position, restart = 0; operators without a paper constant keep the position; re-warmup from the config."""
    from megagrow.config import Stage
    from megagrow.growth.ops import FFN, Depth, Width
    from megagrow.state.executor import lr_placement

    client = 50 + 150  # the source's schedule position: lr_offset 50 + step 150
    st = lambda how: Stage(optim=OptimConfig(lr_placement=how, rewarmup_steps=20))  # noqa: E731
    assert lr_placement(Width(2), client, st("paper")) == (112, 20)  # floor(200 / 1.776)
    assert lr_placement(Depth(2), client, st("paper")) == (141, 20)  # floor(200 / 1.412)
    assert lr_placement(FFN(512), client, st("paper")) == (200, 20)
    assert lr_placement(Width(2), client, st("keep")) == (200, 20)
    assert lr_placement(Width(2), client, st("restart")) == (0, 20)
    # auto (the default): restart after width growth, paper after any other
    assert OptimConfig().lr_placement == "auto"
    assert lr_placement(Width(2), client, st("auto")) == (0, 20)
    assert lr_placement(Depth(2), client, st("auto")) == (141, 20)
    assert lr_placement(FFN(512), client, st("auto")) == (200, 20)
