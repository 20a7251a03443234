"""Every check of a plan that can fail before anything is launched or created."""

from __future__ import annotations

import os

from megagrow.config import Plan
from megagrow.controller.allocation import Allocation, Placement, place
from megagrow.controller.progress import read_manifest
from megagrow.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_ds_config(path: str) -> None:
    """The stage's ds_config file exists and holds a JSON object (as does its zero_optimization, if
    given): the trainer merges it into DeepSpeed's config on every rank, too late for one clear line."""
    import json

    # the trainer's rule (megagrow.parallel.engine.resolve_ds_config), without importing DeepSpeed
    found = next((c for c in (path, os.path.join(REPO_ROOT, path)) if os.path.isfile(c)), None)
    if found is None:
        raise UserError(f"ds_config {path!r} not found")
    try:
        with open(found) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"ds_config {found}: not readable as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"ds_config {found}: expected a JSON object of DeepSpeed settings, got a JSON {type(cfg).__name__}")
    if not isinstance(cfg.get("zero_optimization", {}), dict):
        raise UserError(f"ds_config {found}: zero_optimization must be a JSON object, got a JSON {type(cfg['zero_optimization']).__name__}")


def _data_files(prefix: str) -> list[str]:
    return [f"{prefix}.bin", f"{prefix}.idx"]


def check_dataset(plan: Plan) -> None:
    """The dataset opens (header, index and token file sizes agree: a truncated .bin is caught), its
    vocabulary fits every stage's model, and it holds at least one sequence of every stage: the
    trainer's own checks (data.batches), run here before anything is launched or created."""
    from megagrow.data.megatron import open_dataset

    opened = {}
    for k, stage in enumerate(plan.stages):
        m = stage.model
        if m.vocab_size not in opened:
            opened[m.vocab_size] = open_dataset(plan.data.prefix, vocab_limit=m.vocab_size)
        ds = opened[m.vocab_size]
        where = f"stage {k} ({stage.name})"
        if ds.vocab_size is not None and ds.vocab_size > m.vocab_size:
            raise UserError(
                f"{where}: dataset {plan.data.prefix} has vocab {ds.vocab_size} > the model's vocab_size "
                f"{m.vocab_size} (tokenizer and model do not match)"
            )
        if ds.num_windows(m.seq_len) < 1:
            raise UserError(f"{where}: dataset {plan.data.prefix} is shorter than one sequence of {m.seq_len + 1} tokens")


def validate_plan(plan: Plan, alloc: Allocation, run_dir: str | None = None) -> list[Placement]:
    """Every check that can fail before a launch; raises one UserError. Returns each stage's placement."""
    from megagrow.state.decision import decide

    missing = [p for p in _data_files(plan.data.prefix) if not os.path.isfile(p)]
    if missing:
        raise UserError(
            f"dataset {plan.data.prefix!r} not found ({', '.join(missing)} missing; make it with tools/prepare_data.py or pass --data)"
        )
    placements = []
    for k, stage in enumerate(plan.stages):
        where = f"stage {k} ({stage.name})"
        if k == 0 and stage.grow:
            raise UserError(f"{where}: the first stage has no previous stage to grow from (grow: {stage.grow})")
        if k > 0:
            prev = plan.stages[k - 1]
            if stage.grow is None and stage.model != prev.model:
                raise UserError(f"{where}: the model differs from stage {prev.name!r} but no `grow` operator is given")
            try:
                decide(plan, k, prev.model)  # the decision the transition into stage k makes
            except UserError as e:
                raise UserError(f"{where}: grow {stage.grow or 'identity'!r} from stage {prev.name!r}: {e}") from None
        if stage.init_from:  # a transformers model to start from: config checked against the stage (json only)
            from megagrow.hf import check_init_from

            try:
                check_init_from(stage)
            except UserError as e:
                raise UserError(f"{where}: init_from: {e}") from None
        if stage.layout.ds_config:
            try:
                check_ds_config(stage.layout.ds_config)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
        placements.append(place(stage, alloc, where))
    check_dataset(plan)  # after the plan's own checks: a config mistake is reported first
    if run_dir is not None:
        check_run_dir(plan, run_dir)
    return placements


def check_run_dir(plan: Plan, run_dir: str) -> None:
    """A run directory belongs to one plan: refuse to continue a run of another model chain."""
    m = read_manifest(run_dir)
    if not m:
        return
    old = m.get("plan", {}).get("stages", [])
    new = [s.to_dict() for s in plan.stages]
    for i, (a, b) in enumerate(zip(old, new)):
        for key in ("name", "model", "grow"):
            if a.get(key) != b.get(key):
                raise UserError(
                    f"run directory {run_dir} holds a run of another plan (stage {i} {key} was "
                    f"{a.get(key)!r}, now {b.get(key)!r}); use another --run-dir"
                )
