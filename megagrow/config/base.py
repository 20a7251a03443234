"""The machinery every config dataclass shares: building one from a plain dict (YAML), checking each
value against its field's type, validating once, and the JSON-able `to_dict` form.

`_Config` is the mixin; `_from_dict` rejects unknown keys, builds nested configs (a field whose type
is another config) from their own dicts and checks every other value with `_typed`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megagrow.errors import UserError


def _from_dict(cls, d: Any, where: str):
    """Build dataclass `cls` from dict `d`, rejecting unknown keys with a clear message."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping, got {type(d).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(names)})")
    kwargs = {}
    hints = _field_types(cls)
    for k, v in d.items():
        sub = _subconfig(cls, k)
        kwargs[k] = sub.from_dict(v, f"{where}.{k}") if sub is not None else _typed(v, hints[k], where, k)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # missing required field
        raise UserError(f"{where}: {e}") from None
    obj.validate(where)
    return obj


# ---- field types: every value read from a plan is checked against its dataclass field's type,
# in one place, before any validate() compares it. The rules:
#   int    an int (not a bool, not a float, not a string)
#   float  an int or a float, or a string that reads as a finite number: YAML 1.1 (PyYAML) reads
#          `lr: 3e-4` and `1.0e6` as strings, and that is how people write learning rates.
#          Only float fields accept such strings (`dropout: "0.1"` is read as 0.1); never NaN/inf.
#   bool   true/false only;   str   a string only (`grow: 2` is an error)
#   Optional[X]  None (YAML `null` or the key left out) or an X;   tuple  a list
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", tuple: "a list"}
_HINTS: dict = {}


def _field_types(cls) -> dict:
    """{field name: (base type, optional)} of a config dataclass, from its annotations."""
    if cls not in _HINTS:
        import typing

        out = {}
        for name, hint in typing.get_type_hints(cls).items():
            args = typing.get_args(hint)
            optional = type(None) in args
            base = next((a for a in args if a is not type(None)), hint) if args else hint
            out[name] = (base, optional)
        _HINTS[cls] = out
    return _HINTS[cls]


def _subconfig(cls, name: str):
    """The config class of field `name` of config `cls` when that field is a nested config (Stage.model,
    ModelConfig.rope_scaling, Plan.data, ...), else None. Read from the field's annotation."""
    base = _field_types(cls)[name][0] if name in _field_types(cls) else None
    return base if isinstance(base, type) and issubclass(base, _Config) else None


def _typed(v: Any, hint: tuple, where: str, name: str) -> Any:
    """`v` checked against (base type, optional); float-like strings become floats for float fields."""
    import math

    base, optional = hint
    if v is None and optional:
        return v
    if base is float:
        if isinstance(v, str):
            try:
                f = float(v.strip())
            except ValueError:
                f = None
            if f is not None and math.isfinite(f):
                return f
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            if math.isfinite(v):
                return float(v)
            raise UserError(f"{where}: {name} must be a finite number, got {v!r}")
    elif base is int:
        if _is_int(v):
            return v
    elif base is bool or base is str or base is tuple:
        if isinstance(v, (list, tuple) if base is tuple else base):
            return tuple(v) if base is tuple else v
    else:  # a nested config or another type: checked by its own validate()
        return v
    want = _TYPE_NAMES[base] + (" or null" if optional else "")
    got = type(v).__name__ if v is not None else "null"
    shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
    raise UserError(f"{where}: {name} must be {want}, got {got} {shown}")


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise UserError(f"{where}: {msg}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Config:
    """Mixin: dict round trip + `replace`."""

    @classmethod
    def from_dict(cls, d: Any, where: str | None = None):
        return _from_dict(cls, d, where or cls.__name__)

    def to_dict(self) -> dict:
        # dataclasses.asdict, except that a field marked omit_if_none is left out while it is None (a field
        # added later, e.g. ModelConfig.rope_scaling, so the dicts recorded before it existed still compare equal)
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not (f.metadata.get("omit_if_none") and getattr(self, f.name) is None)
        }

    def replace(self, **kw):
        hints = _field_types(type(self))
        kw = {k: _typed(v, hints[k], type(self).__name__, k) if k in hints else v for k, v in kw.items()}
        obj = dataclasses.replace(self, **kw)
        obj.validate(type(self).__name__)
        return obj


def _plain(v: Any) -> Any:
    """A field value in to_dict's form: configs as their to_dict, containers copied (as dataclasses.asdict does)."""
    import copy

    if isinstance(v, _Config):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return type(v)(_plain(x) for x in v)
    if isinstance(v, dict):
        return {_plain(k): _plain(x) for k, x in v.items()}
    return copy.deepcopy(v)
