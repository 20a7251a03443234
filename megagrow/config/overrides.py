"""Plan overrides: `--set stages.wide.optim.lr=2e-3 --set reliability.keep_last=3` on the command line.

KEY is a dotted path into the plan as written in YAML: a top-level section (reliability, data, defaults, name,
seed), or stages.S.... where S is a stage's name, its 0-based index, or * (every stage). VALUE is read as YAML
(2e-3, true, null, text). The key is checked against the config fields before anything is applied; the value
is validated with the whole plan, exactly as if it had been written in the file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megagrow.config.base import _subconfig
from megagrow.config.plan import Plan, _merge
from megagrow.config.stage import Stage
from megagrow.errors import UserError


def parse_override(text: str) -> tuple[list[str], Any]:
    """ "a.b.c=VALUE" -> (["a", "b", "c"], VALUE read as YAML)."""
    import yaml

    key, eq, raw = text.partition("=")
    path = key.strip().split(".")
    if not eq or not all(path):
        raise UserError(f"--set {text}: expected KEY=VALUE with a dotted KEY (e.g. stages.wide.optim.lr=2e-3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"--set {text}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return path, value


def _check_key(cls, path: list[str], shown: str) -> None:
    """Each part of `path` is a field of the config below it (`cls` first); only sections have parts below."""
    for i, part in enumerate(path):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            top = cls is Plan
            raise UserError(
                f"--set {shown}: unknown key {part!r} "
                + (f"in {'.'.join(path[:i])}" if i else "at the top level")
                + f" (allowed: {', '.join(names + ['defaults'] if top else names)})"
            )
        sub = _subconfig(cls, part)
        if sub is None and i < len(path) - 1:
            raise UserError(f"--set {shown}: {'.'.join(path[: i + 1])} is a value, not a section")
        cls = sub


def _put(d: dict, path: list[str], value: Any, shown: str) -> None:
    """d[path[0]][path[1]]... = value, making the mappings the file left out."""
    for i, part in enumerate(path[:-1]):
        if d.get(part) is None:
            d[part] = {}
        if not isinstance(d[part], dict):
            raise UserError(f"--set {shown}: {'.'.join(path[: i + 1])} in the plan is not a mapping")
        d = d[part]
    d[path[-1]] = value


def apply_overrides(d: Any, overrides: tuple | list) -> dict:
    """A copy of the plan dict `d` (as read from YAML) with each "KEY=VALUE" of `overrides` applied in
    order; an override naming a key the plan cannot have, or a stage it does not have, is an error."""
    import copy

    if not isinstance(d, dict):
        raise UserError("plan: expected a mapping at the top level")
    d = copy.deepcopy(d)
    for text in overrides:
        path, value = parse_override(text)
        head, rest = path[0], path[1:]
        if head in ("stages", "defaults"):
            if head == "stages" and not rest:
                raise UserError(f"--set {text}: name a stage: stages.NAME.KEY, stages.INDEX.KEY or stages.*.KEY")
            keys = rest[1:] if head == "stages" else rest
            if not keys:
                raise UserError(f"--set {text}: name a key of the stage, e.g. {head}{'.' + rest[0] if rest else ''}.optim.lr")
            _check_key(Stage, keys, text)
            if head == "defaults":
                _put(d, path, value, text)
                continue
            stages = d.get("stages")
            if not isinstance(stages, list):
                raise UserError(f"--set {text}: the plan has no list of stages")
            for s in _pick_stages(d, rest[0], text):
                _put(s, keys, value, text)
        else:
            _check_key(Plan, path, text)
            _put(d, path, value, text)
    return d


def _pick_stages(d: dict, which: str, shown: str) -> list:
    """The stage dicts `which` names: a stage name, a 0-based index, or * (all)."""
    stages = d["stages"]
    for i, s in enumerate(stages):
        if s is None:  # an empty stage entry (all from defaults)
            stages[i] = {}
    if which == "*":
        return stages
    defaults = d.get("defaults") if isinstance(d.get("defaults"), dict) else {}
    names = [str(_merge(defaults, s).get("name", "stage")) if isinstance(s, dict) else "?" for s in stages]
    if which in names:
        return [stages[names.index(which)]]
    if which.isdigit() and int(which) < len(stages):
        return [stages[int(which)]]
    raise UserError(f"--set {shown}: the plan has no stage {which!r} (stages: {', '.join(names)}; or an index 0..{len(stages) - 1}, or *)")


def plan_with_overrides(d: Any, overrides: tuple | list, where: str) -> Plan:
    """Plan.from_dict of `d` with `overrides` applied. A value that fails validation is blamed on the
    override that fails on its own when the file alone is valid ("--set KEY=VALUE: ..." names it)."""
    over = apply_overrides(d, overrides)
    try:
        return Plan.from_dict(over, where)
    except UserError as e:
        err = e
    try:
        Plan.from_dict(d, where)
    except UserError:
        raise err from None  # the file itself is invalid: its own message
    for text in overrides:
        try:
            Plan.from_dict(apply_overrides(d, [text]), where)
        except UserError as one:
            raise UserError(f"--set {text}: {one}") from None
    raise UserError(f"--set {' --set '.join(overrides)}: {err}") from None
