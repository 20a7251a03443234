"""Schedules across growth: the Kaplan scaling law, the stage planner on it, and the slope rule.

(The learning-rate schedule lives in megagrow/schedule/lr.py.)

The names below are re-exported lazily (PEP 562): the trainer imports schedule.lr and
schedule.stop, and must not pay for the planner (scipy, ~0.4 s) at every process start.
"""

import importlib

_LAW = (
    "KaplanLaw",
    "SingleModel",
    "best_single_model",
    "compute_optimal_size",
    "get_law",
    "loss_at_budget",
    "non_embedding_params",
    "parse_size",
    "single_model_compute",
)
_PLANNER = (
    "PaperPair",
    "PlannedStage",
    "StagePlan",
    "optimal_target_loss",
    "paper_pairs",
    "paper_predictions",
    "paper_target_loss",
    "plan_stages",
    "simulate_stages",
)
_SLOPE = (
    "DEPTH_GROW_SLOPE",
    "DEPTH_STEP_DIVISOR",
    "STOP_SLOPE",
    "WIDTH_GROW_SLOPE",
    "WIDTH_STEP_DIVISOR",
    "SlopeRule",
    "find_crossing",
    "grown_step",
    "should_grow",
    "smoothed_slopes",
)
_WHERE = {**{n: "law" for n in _LAW}, **{n: "planner" for n in _PLANNER}, **{n: "slope" for n in _SLOPE}}

__all__ = [*_LAW, *_PLANNER, *_SLOPE]


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"megagrow.schedule.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
