"""load_plan: a plan YAML file -> Plan, with `--set` overrides applied before it is validated and the
layout advice (plan_warnings) printed once per launch."""

from __future__ import annotations

import os

from megagrow.config.overrides import plan_with_overrides
from megagrow.config.plan import Plan, plan_warnings
from megagrow.errors import UserError


def load_plan(path: str, overrides: tuple | list = ()) -> Plan:
    """Read a plan YAML file, with clear errors for a missing or malformed file; `overrides`
    ("KEY=VALUE", `--set` on the command line) are applied to it before it is validated."""
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"plan file not found: {path}")
    try:
        with open(path) as f:
            d = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    plan = plan_with_overrides(d, overrides, os.path.basename(path)) if overrides else Plan.from_dict(d, os.path.basename(path))
    if os.environ.get("RANK", "0") == "0":  # once per launch, not once per rank
        import sys

        for w in plan_warnings(plan):
            print(f"warning: {os.path.basename(path)}: {w}", file=sys.stderr, flush=True)
    return plan
