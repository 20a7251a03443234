"""Growth operators as declarative maps on logical global tensors (docs/design.md).

- megagrow.growth.maps: boxes and pieces (Copy / Fill / Noise), TensorMap, apply
- megagrow.growth.base: the Operator base class, its helpers and Identity (pure resharding)
- megagrow.growth.width: Width (d_model, d_ff and heads times k)
- megagrow.growth.ops: the other operators (Depth, Stack, FFN, Heads), the operator registry,
  plan_growth, operator_between, kaplan_peak_lr
- megagrow.growth.apply: GrowthState, grow(), LRPlacement, the TP=1 (model, AdamW) bridges

docs/growth.md documents every operator, its moment rules and the decisions taken.
"""

from megagrow.growth.apply import GrowthState, LRPlacement, apply_plan, grow, load_training, state_from_training
from megagrow.growth.maps import Copy, Fill, Noise, TensorMap, apply_map, apply_tensor, noise_values
from megagrow.growth.ops import (
    FFN,
    Depth,
    GrowthPlan,
    Heads,
    Identity,
    Operator,
    Stack,
    Width,
    heads_tensors,
    kaplan_peak_lr,
    logical_tensors,
    operator_between,
    operator_from_dict,
    plan_growth,
)

__all__ = [
    "Copy",
    "Depth",
    "FFN",
    "Fill",
    "GrowthPlan",
    "GrowthState",
    "Heads",
    "Identity",
    "LRPlacement",
    "Noise",
    "Operator",
    "Stack",
    "TensorMap",
    "Width",
    "apply_map",
    "apply_plan",
    "apply_tensor",
    "grow",
    "heads_tensors",
    "kaplan_peak_lr",
    "load_training",
    "logical_tensors",
    "noise_values",
    "operator_between",
    "operator_from_dict",
    "plan_growth",
    "state_from_training",
]
