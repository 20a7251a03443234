"""Schedules across growth: the Kaplan scaling-law stage planner and the slope rule.

(The learning-rate schedule lives in megagrow/schedule/lr.py.)
"""

from megagrow.schedule.planner import (
    KaplanLaw,
    PaperPair,
    PlannedStage,
    SingleModel,
    StagePlan,
    best_single_model,
    compute_optimal_size,
    get_law,
    loss_at_budget,
    non_embedding_params,
    optimal_target_loss,
    paper_pairs,
    paper_predictions,
    paper_target_loss,
    parse_size,
    plan_stages,
    simulate_stages,
    single_model_compute,
)
from megagrow.schedule.slope import (
    DEPTH_GROW_SLOPE,
    DEPTH_STEP_DIVISOR,
    STOP_SLOPE,
    WIDTH_GROW_SLOPE,
    WIDTH_STEP_DIVISOR,
    SlopeRule,
    find_crossing,
    grown_step,
    should_grow,
    smoothed_slopes,
)

__all__ = [
    "KaplanLaw", "PaperPair", "PlannedStage", "SingleModel", "StagePlan", "best_single_model",
    "compute_optimal_size", "get_law", "loss_at_budget", "non_embedding_params",
    "optimal_target_loss", "paper_pairs", "paper_predictions", "paper_target_loss", "parse_size",
    "plan_stages", "simulate_stages", "single_model_compute",
    "DEPTH_GROW_SLOPE", "DEPTH_STEP_DIVISOR", "STOP_SLOPE", "WIDTH_GROW_SLOPE", "WIDTH_STEP_DIVISOR",
    "SlopeRule", "find_crossing", "grown_step", "should_grow", "smoothed_slopes",
]
