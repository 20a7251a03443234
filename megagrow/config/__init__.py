"""Typed configuration: the model, the parallel layout, the optimizer, a stage, a plan.

Every config is a frozen dataclass, built from plain dicts (YAML) by `from_dict`, which
rejects unknown keys and validates once. `to_dict` gives the JSON-able form recorded in
every checkpoint. Nothing here imports torch: configs are cheap to load in any tool.

The modules, one concern each (import from `megagrow.config`, which re-exports them all):
  base.py       the shared machinery: from_dict, field type checks, to_dict, replace
  model.py      ModelConfig and RopeScaling (the model; layout-free)
  stage.py      Layout, OptimConfig, StopRule, GrowthOptions, Stage; stage_warnings (layout advice)
  plan.py       DataConfig, Reliability, Plan (stages with the plan's defaults merged in); plan_warnings
  overrides.py  `--set KEY=VALUE`: parse_override, apply_overrides, plan_with_overrides
  load.py       load_plan: a plan YAML file, overrides applied, advice printed
"""

# the public names, and the private helpers the single config.py had (importable from here as before)
from megagrow.config.base import _Config, _field_types, _from_dict, _is_int, _need, _plain, _subconfig, _typed  # noqa: F401
from megagrow.config.load import load_plan  # noqa: F401
from megagrow.config.model import (  # noqa: F401
    FLAVOURS,
    LLAMA3_ROPE_KEYS,
    ROPE_SCALING_TYPES,
    ROPE_TYPE_KEYS,
    VOCAB_MULTIPLE,
    YARN_OPTIONAL_KEYS,
    ModelConfig,
    RopeScaling,
)
from megagrow.config.overrides import _check_key, _pick_stages, _put, apply_overrides, parse_override, plan_with_overrides  # noqa: F401
from megagrow.config.plan import DataConfig, Plan, Reliability, _merge, plan_warnings  # noqa: F401
from megagrow.config.stage import (  # noqa: F401
    COMPILE,
    DTYPES,
    LR_SCHEDULES,
    OPTIMIZER_STATE,
    RECOMPUTE,
    STATE_BYTES,
    STOP_RULES,
    GrowthOptions,
    Layout,
    OptimConfig,
    Stage,
    StopRule,
    recompute_mode,
    stage_warnings,
)
