"""Growth operators: each one turns a ModelConfig into a bigger one and declares, as data
(megagrow.growth.maps), how every new logical tensor and its Adam moments are made.

    op = Width(2)                      # d_model, d_ff, n_heads x k (head_dim kept), block diagonal
    op = Depth(2, placement="interleave")   # exact: inserted layers are identity on the residual
    op = Stack(2)                      # G_stack: the layer list k times (NOT loss preserving)
    op = FFN(d_ff=256)                 # d_ff grows, new fc2/down columns zero (exact)
    op = Identity()                    # no change of model: pure resharding
    gp = plan_growth(op, old_config)   # GrowthPlan: new config + {name: TensorMap}

Moment rules (the factor each piece carries for exp_avg ``m`` and exp_avg_sq ``v``) follow
the gradient the grown model actually has at the moment of growth: a tensor whose gradient
is g*s right after growth gets m*s and v*s**2, so Adam's per-element step m/(sqrt(v)+eps) is
unchanged (up to eps). tests/unit/test_growth.py checks each of these gradient scales
numerically. See docs/growth.md for the derivations and the decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.growth.base import Identity, Operator, _cfg, _copy_all, _need_factor, is_output_proj
from megagrow.growth.maps import Copy, Fill, Noise, TensorMap, full_box
from megagrow.growth.width import Width
from megagrow.params import block_tensors, kaplan_params, logical_tensors


def _layer_of(name: str) -> tuple[int, str] | None:
    if not name.startswith("blocks."):
        return None
    _, i, rel = name.split(".", 2)
    return int(i), rel


def _non_block(old: ModelConfig) -> dict[str, TensorMap]:
    return {n: _copy_all(n, s) for n, s in logical_tensors(old).items() if not n.startswith("blocks.")}


@dataclass(frozen=True)
class Depth(Operator):
    """n_layers times `factor`, exactly loss preserving: each inserted layer is an identity on
    the residual stream (its output projections, attn.o and mlp.fc2/down, weights and biases
    are zero). placement "interleave": after old layer i come its k-1 new layers; "append":
    the new layers follow the whole old stack. new_layers "copy" (default): the inserted
    layer's other tensors copy its source layer (i for interleave, i mod L for append);
    "init": freshly initialised (seeded noise of std init_std, norm gains 1, biases 0).
    Moments of every inserted tensor are zero; old layers keep theirs unscaled (their
    gradient is unchanged, since an identity layer with zero output weights passes the
    residual gradient through unchanged)."""

    factor: int = 2
    placement: str = "interleave"
    new_layers: str = "copy"
    name = "depth"

    @property
    def paper_c(self):
        return 1.412 if self.factor == 2 else None

    def new_config(self, old):
        k = _need_factor(self.factor, "depth")
        if self.placement not in ("interleave", "append"):
            raise UserError(f"depth placement must be 'interleave' or 'append', got {self.placement!r}")
        if self.new_layers not in ("copy", "init"):
            raise UserError(f"depth new_layers must be 'copy' or 'init', got {self.new_layers!r}")
        return _cfg(old, n_layers=k * old.n_layers)

    def source_layer(self, n: int, L: int) -> tuple[int, bool]:
        """(old layer, inserted?) for new layer n."""
        k = self.factor
        if self.placement == "interleave":
            return n // k, n % k != 0
        return n % L, n >= L

    def tensors(self, old, new):
        out = _non_block(old)
        L = old.n_layers
        for n in range(new.n_layers):
            i, inserted = self.source_layer(n, L)
            for rel, s in block_tensors(old).items():
                name, src = f"blocks.{n}.{rel}", f"blocks.{i}.{rel}"
                b = full_box(s)
                if not inserted:
                    p = Copy(b, src, b, 1.0, 1.0, 1.0)
                elif is_output_proj(rel):
                    p = Fill(b, 0.0)
                elif self.new_layers == "copy":
                    p = Copy(b, src, b, 1.0, 0.0, 0.0)
                elif rel.endswith(".bias"):
                    p = Fill(b, 0.0)
                elif len(s) == 1:
                    p = Fill(b, 1.0)
                else:
                    p = Noise(b, f"{name}#depth-init:{new.n_layers}", old.init_std)
                out[name] = TensorMap(name, tuple(s), (p,))
        return out


@dataclass(frozen=True)
class Stack(Operator):
    """G_stack: the whole layer list `factor` times (layer j*L + i copies old layer i, moments
    included, unscaled). NOT loss preserving: documented and tested as such."""

    factor: int = 2
    name = "stack"
    exact = False

    def new_config(self, old):
        return _cfg(old, n_layers=_need_factor(self.factor, "stack") * old.n_layers)

    def tensors(self, old, new):
        out = _non_block(old)
        for n in range(new.n_layers):
            for rel, s in block_tensors(old).items():
                out[f"blocks.{n}.{rel}"] = _copy_all(f"blocks.{n}.{rel}", s, f"blocks.{n % old.n_layers}.{rel}")
        return out


@dataclass(frozen=True)
class FFN(Operator):
    """d_ff -> a larger `d_ff`, exact: new fc1/gate/up rows are seeded noise (std init_std),
    new fc1 bias entries 0, new fc2/down columns 0. Old entries and their moments copied
    unscaled; new entries' moments zero."""

    d_ff: int = 0
    name = "ffn"

    def new_config(self, old):
        if isinstance(self.d_ff, bool) or not isinstance(self.d_ff, int) or self.d_ff <= old.ffn_dim:
            raise UserError(f"FFN growth needs a d_ff larger than the current {old.ffn_dim}, got {self.d_ff!r} (shrinking is not growth)")
        return _cfg(old, d_ff=self.d_ff)

    def tensors(self, old, new):
        F, F2, d = old.ffn_dim, new.ffn_dim, old.d_model
        out = {}
        for name, s in logical_tensors(old).items():
            li = _layer_of(name)
            rel = li[1] if li else ""
            if rel in ("mlp.fc1.weight", "mlp.gate.weight", "mlp.up.weight"):
                ns = (F2, d)
                pieces = (Copy(full_box(s), name, full_box(s), 1.0, 1.0, 1.0), Noise(((F, F2), (0, d)), f"{name}#ffn:{F2}", old.init_std))
            elif rel == "mlp.fc1.bias":
                ns = (F2,)
                pieces = (Copy(full_box(s), name, full_box(s), 1.0, 1.0, 1.0), Fill(((F, F2),), 0.0))
            elif rel in ("mlp.fc2.weight", "mlp.down.weight"):
                ns = (d, F2)
                pieces = (Copy(full_box(s), name, full_box(s), 1.0, 1.0, 1.0), Fill(((0, d), (F, F2)), 0.0))
            else:
                out[name] = _copy_all(name, s)
                continue
            out[name] = TensorMap(name, ns, pieces)
        return out


@dataclass(frozen=True)
class Heads(Operator):
    """n_heads -> more heads with head_dim fixed, d_model unchanged: the attention inner
    dim (ModelConfig.attn_dim = n_heads * head_dim) grows past d_model. Exact: the new
    heads' output columns of o are zero. Grouped-query attention: the group size is kept
    (n_kv_heads grows to n_heads' / group, the new query heads read new K/V heads), so
    every old query head keeps reading its own K/V head; n_heads' must be a multiple of
    the group size."""

    n_heads: int = 0
    name = "heads"

    def new_config(self, old):
        if not isinstance(self.n_heads, int) or self.n_heads <= old.n_heads:
            raise UserError(f"heads growth needs more than the current {old.n_heads} heads, got {self.n_heads!r}")
        kv = None
        if old.n_kv_heads is not None:
            group = old.n_heads // old.n_kv_heads
            if self.n_heads % group:
                raise UserError(
                    f"heads growth keeps the query-group size {group} (n_heads / n_kv_heads): {self.n_heads} heads is not a multiple of it"
                )
            kv = self.n_heads // group
        return _cfg(old, n_heads=self.n_heads, head_dim=old.head_dim, n_kv_heads=kv)

    def tensors(self, old, new):
        return heads_tensors(old, self.n_heads)


def heads_tensors(old, n_heads: int) -> dict[str, TensorMap]:
    """Heads-only growth map (for the pending head_dim model change): q/k/v gain rows
    [H hd, H' hd) of seeded noise (biases 0), o gains zero input columns; exact. Old
    entries and moments copied unscaled, new ones' moments zero (the old heads' gradient
    is unchanged: the new heads add nothing to the output while o's new columns are 0).
    `old` needs flavour, n_layers, d_model, n_heads, head_dim, ffn_dim, padded_vocab,
    seq_len, tie_embeddings, init_std (a ModelConfig, or a stand-in until it has head_dim)."""
    hd, d = old.head_dim, old.d_model
    A, A2 = old.n_heads * hd, n_heads * hd
    group = old.n_heads // getattr(old, "kv_heads", old.n_heads)
    K, K2 = A // group, A2 // group  # K/V rows: the query-group size is kept
    out = {}
    for name, s in logical_tensors(old).items():
        li = _layer_of(name)
        rel = li[1] if li else ""
        if rel in ("attn.q.weight", "attn.k.weight", "attn.v.weight"):
            a, a2 = (A, A2) if rel == "attn.q.weight" else (K, K2)
            out[name] = TensorMap(
                name,
                (a2, d),
                (Copy(full_box(s), name, full_box(s), 1.0, 1.0, 1.0), Noise(((a, a2), (0, d)), f"{name}#heads:{n_heads}", old.init_std)),
            )
        elif rel in ("attn.q.bias", "attn.k.bias", "attn.v.bias"):
            a, a2 = (A, A2) if rel == "attn.q.bias" else (K, K2)
            out[name] = TensorMap(name, (a2,), (Copy(full_box(s), name, full_box(s), 1.0, 1.0, 1.0), Fill(((a, a2),), 0.0)))
        elif rel == "attn.o.weight":
            out[name] = TensorMap(name, (d, A2), (Copy(full_box(s), name, full_box(s), 1.0, 1.0, 1.0), Fill(((0, d), (A, A2)), 0.0)))
        else:
            out[name] = _copy_all(name, s)
    return out


OPERATORS = {"identity": Identity, "width": Width, "depth": Depth, "stack": Stack, "ffn": FFN, "heads": Heads}


def operator_from_dict(d: dict) -> Operator:
    """Inverse of Operator.describe() (what a checkpoint manifest records)."""
    d = dict(d)
    kind = d.pop("op", None)
    if kind not in OPERATORS:
        raise UserError(f"unknown growth operator {kind!r} (one of {', '.join(OPERATORS)})")
    try:
        return OPERATORS[kind](**d)
    except TypeError as e:
        raise UserError(f"growth operator {kind}: {e}") from None


# ---------------------------------------------------------------------------------------
# a planned growth


@dataclass(frozen=True)
class GrowthPlan:
    """An operator applied to a config: the new config and the declarative tensor map."""

    op: Operator
    old: ModelConfig
    new: ModelConfig
    tensors: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "op": self.op.describe(),
            "old": self.old.to_dict(),
            "new": self.new.to_dict(),
            "tensors": {n: t.to_dict() for n, t in self.tensors.items()},
        }


def plan_growth(op: Operator, old: ModelConfig, target: ModelConfig | None = None) -> GrowthPlan:
    """Apply `op` to config `old`; check the result against `target` (e.g. the plan's next
    stage) if given, and check the map covers exactly the new model's tensors."""
    if not isinstance(op, Operator):
        raise UserError(f"not a growth operator: {op!r}")
    new = op.new_config(old)
    if target is not None and _resolved(new) != _resolved(target):
        diff = {k: (v, _resolved(target)[k]) for k, v in _resolved(new).items() if _resolved(target)[k] != v}
        raise UserError(
            f"{op.name} growth of {_summary(old)} gives {_summary(new)}, but the target model is "
            f"{_summary(target)} (differences, grown vs target: {diff})"
        )
    tensors = op.tensors(old, new)
    want = logical_tensors(new)
    if set(tensors) != set(want):  # a bug, not a user error
        raise AssertionError(f"{op.name}: map names differ from the model's: {sorted(set(tensors) ^ set(want))}")
    old_shapes = logical_tensors(old)
    for n, t in tensors.items():
        if tuple(t.shape) != tuple(want[n]):
            raise AssertionError(f"{op.name}: {n} shape {t.shape} != model shape {want[n]}")
        t.check(old_shapes)
    return GrowthPlan(op, old, target if target is not None else new, tensors)


def _resolved(c: ModelConfig) -> dict:
    d = c.to_dict()
    d["d_ff"] = c.ffn_dim
    return d


def _summary(c: ModelConfig) -> str:
    return f"{c.flavour} L={c.n_layers} d={c.d_model} H={c.n_heads} d_ff={c.ffn_dim}"


def operator_between(spec: str, old: ModelConfig, new: ModelConfig, symmetry_breaking: float = 1.0) -> Operator:
    """The operator of `growth_between` (its growth plan, built to validate it, dropped)."""
    return growth_between(spec, old, new, symmetry_breaking)[0]


def growth_between(spec: str, old: ModelConfig, new: ModelConfig, symmetry_breaking: float = 1.0) -> tuple[Operator, GrowthPlan]:
    """The operator named by a stage's `grow` field that takes config `old` to `new`, and its growth
    plan (`plan_growth(op, old, new)`, built once: it is also the check that op takes old to new).

    spec: "width" | "width:init" | "depth" | "depth:append" | "depth:interleave:init" | "stack" | "ffn" |
    "heads" | "identity" (the factor is read off the two configs). Raises UserError when the configs
    are not related that way (e.g. depth growth to a model whose n_layers is no multiple).
    """
    parts = (spec or "").split(":")
    kind = parts[0]
    if kind == "width":
        if new.d_model % old.d_model:
            raise UserError(f"width growth: new d_model {new.d_model} is not a multiple of {old.d_model}")
        if len(parts) > 2 or parts[1:] not in ([], ["copy"], ["init"]):
            raise UserError(f"unknown width growth {spec!r} (width, width:copy or width:init)")
        op: Operator = Width(new.d_model // old.d_model, symmetry_breaking, new_units=(parts[1:] or ["copy"])[0])
    elif kind == "depth":
        if new.n_layers % old.n_layers:
            raise UserError(f"depth growth: new n_layers {new.n_layers} is not a multiple of {old.n_layers}")
        op = Depth(new.n_layers // old.n_layers, *(parts[1:3]))
    elif kind == "stack":
        if new.n_layers % old.n_layers:
            raise UserError(f"stack growth: new n_layers {new.n_layers} is not a multiple of {old.n_layers}")
        op = Stack(new.n_layers // old.n_layers)
    elif kind == "ffn":
        op = FFN(new.ffn_dim)
    elif kind == "heads":
        op = Heads(new.n_heads)
    elif kind == "identity":
        op = Identity()
    else:
        raise UserError(
            f"unknown growth operator {spec!r} (width[:copy|init], depth[:interleave|append[:copy|init]], stack, ffn, heads, identity)"
        )
    return op, plan_growth(op, old, new)  # validates that op really takes old to new


# ---------------------------------------------------------------------------------------
# learning rate across growth


def kaplan_peak_lr(c: ModelConfig) -> float:
    """The reference code's peak LR: 0.003239 - 0.0001395 log10(N), N = 12 L d^2 (Kaplan's count)."""
    N = kaplan_params(c.n_layers, c.d_model)
    return 0.003239 - 0.0001395 * math.log10(N)
