"""A whole plan: the shared data (DataConfig), seed and fault handling (Reliability), and the stages in
order (Plan), built from the YAML dict with the plan's `defaults` deep-merged under each stage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megagrow.config.base import _Config, _from_dict, _is_int, _need, _plain
from megagrow.config.stage import Stage, stage_warnings
from megagrow.errors import UserError


@dataclass(frozen=True)
class DataConfig(_Config):
    """A memory-mapped token dataset (PREFIX.bin/.idx from tools/prepare_data.py)."""

    prefix: str = "data_cache/stdlib"

    def validate(self, where: str = "data") -> None:
        _need(isinstance(self.prefix, str) and self.prefix, where, "prefix must be a path prefix")


@dataclass(frozen=True)
class Reliability(_Config):
    """How a run guards its progress against faults (docs/reliability.md)."""

    # complete checkpoints kept per stage (0: all); the newest complete one is never deleted. 2: the newest
    # and one to fall back on when it turns out damaged (at 70B ZeRO-1 a save is ~1 TB: keeping all fills a file system)
    keep_last: int = 2
    # steps whose loss or gradient norm is not finite that a stage tolerates when the update was skipped
    # (the weights stayed finite); 0: the first one stops the stage. Weights are never saved non-finite.
    skip_nonfinite_steps: int = 0
    collective_timeout_s: float = 600.0  # a collective waiting longer (a hung or lost rank) ends the stage
    # `megagrow run`: a failed stage is launched again this often, from its newest complete checkpoint
    # (under Slurm on the allocation's other hosts first, where it has others); then the run fails
    retries: int = 2
    verify_on_resume: bool = True  # check every file's CRC-32 against the manifest before resuming
    # `megagrow run`: a stage whose rank 0 has shown no progress (a finished step) for this long is hung
    # (every rank stuck outside a collective, e.g. on a dead file system): its ranks are killed and the
    # stage is retried like a failed one. 0: off. Start-up, evals and saves count against it: keep it well above them.
    hang_timeout_s: float = 1800.0

    def validate(self, where: str = "reliability") -> None:
        _need(self.keep_last >= 0, where, f"keep_last must be >= 0, got {self.keep_last}")
        _need(self.skip_nonfinite_steps >= 0, where, f"skip_nonfinite_steps must be >= 0, got {self.skip_nonfinite_steps}")
        _need(self.collective_timeout_s > 0, where, f"collective_timeout_s must be positive, got {self.collective_timeout_s}")
        _need(self.retries >= 0, where, f"retries must be >= 0, got {self.retries}")
        _need(self.hang_timeout_s >= 0, where, f"hang_timeout_s must be >= 0 (0: off), got {self.hang_timeout_s}")


@dataclass(frozen=True)
class Plan(_Config):
    """A staged run: shared data and seed, then the stages in order."""

    name: str = "plan"
    seed: int = 1234
    data: DataConfig = field(default_factory=DataConfig)
    stages: tuple = ()
    reliability: Reliability = field(default_factory=Reliability)

    @classmethod
    def from_dict(cls, d: Any, where: str | None = None) -> Plan:
        where = where or "plan"
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a mapping at the top level")
        d = dict(d)
        stages = d.pop("stages", None)
        if not isinstance(stages, list) or not stages:
            raise UserError(f"{where}: 'stages' must be a non-empty list")
        defaults = d.pop("defaults", {}) or {}
        if not isinstance(defaults, dict):
            raise UserError(f"{where}: 'defaults' must be a mapping, got {type(defaults).__name__}")
        built = []
        for i, s in enumerate(stages):
            built.append(Stage.from_dict(_merge(defaults, s), f"{where}.stages[{i}]"))
        plan = _from_dict(cls, d, where)
        plan = dataclasses.replace(plan, stages=tuple(built))
        plan.validate(where)
        return plan

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "seed": self.seed,
            "data": self.data.to_dict(),
            "stages": [s.to_dict() for s in self.stages],
            "reliability": self.reliability.to_dict(),
        }

    def validate(self, where: str = "plan") -> None:
        _need(_is_int(self.seed) and self.seed >= 0, where, "seed must be a non-negative integer")
        names = [s.name for s in self.stages]
        _need(len(set(names)) == len(names), where, f"stage names must be unique, got {names}")
        later = [s.name for s in self.stages[1:] if s.init_from is not None]
        _need(not later, where, f"only the first stage may have init_from (stage(s) {', '.join(later)} grow from the one before)")
        for s in self.stages[1:]:  # no growth operator changes the RoPE scaling (it depends on neither width nor depth)
            _need(
                s.model.rope_scaling == self.stages[0].model.rope_scaling,
                where,
                f"stage {s.name}: rope_scaling {_plain(s.model.rope_scaling)} differs from stage {self.stages[0].name}'s "
                f"{_plain(self.stages[0].model.rope_scaling)} (growth keeps it: give every stage the same, e.g. in defaults)",
            )

    def stage(self, key: int | str) -> Stage:
        """A stage by 0-based index or by name."""
        if isinstance(key, str) and not key.isdigit():
            for s in self.stages:
                if s.name == key:
                    return s
            raise UserError(f"plan {self.name!r} has no stage named {key!r} (stages: {', '.join(s.name for s in self.stages)})")
        k = int(key)
        if not 0 <= k < len(self.stages):
            raise UserError(f"plan {self.name!r} has stages 0..{len(self.stages) - 1}, got {k}")
        return self.stages[k]


def plan_warnings(plan: Plan) -> list[str]:
    return [f"stage {s.name}: {w}" for s in plan.stages for w in stage_warnings(s)]


def _merge(base: dict, over: Any) -> Any:
    """Deep-merge plan `defaults` under a stage's own keys."""
    if not isinstance(over, dict) or not isinstance(base, dict):
        return over
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base.get(k), v) if isinstance(base.get(k), dict) else v
    return out
