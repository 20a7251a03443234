"""Typed configuration: the model, the parallel layout, the optimizer, a stage, a plan.

Every config is a frozen dataclass, built from plain dicts (YAML) by `from_dict`, which
rejects unknown keys and validates once. `to_dict` gives the JSON-able form recorded in
every checkpoint. Nothing here imports torch: configs are cheap to load in any tool.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from megagrow import params as _params
from megagrow.errors import UserError

FLAVOURS = ("gpt2", "llama")
DTYPES = ("fp32", "bf16")
LR_SCHEDULES = ("cosine", "linear", "constant")
VOCAB_MULTIPLE = 128  # vocab padded to a multiple of this, independent of TP (layout-free)
RECOMPUTE = ("none", "attention", "mlp", "full")  # Stage.activation_checkpointing: what backward recomputes
COMPILE = ("auto", "on", "off")  # Stage.compile: torch.compile each transformer block (auto: on CUDA, off on CPU)


def recompute_mode(v: Any) -> Any:
    """Stage.activation_checkpointing's canonical value: true/false (plans written when it was a
    boolean) are full/none; anything else is returned as given (validate() checks it)."""
    return {True: "full", False: "none"}.get(v, v) if isinstance(v, bool) else v


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
        sub = _SUBCONFIGS.get((cls.__name__, k))
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
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not (f.metadata.get("omit_if_none") and getattr(self, f.name) is None)}

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


ROPE_SCALING_TYPES = ("llama3", "linear", "dynamic", "yarn")  # RopeScaling.rope_type (None: plain RoPE, no rope_scaling)
LLAMA3_ROPE_KEYS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
YARN_OPTIONAL_KEYS = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")
# the settings each type takes besides rope_type and factor: (required, optional)
ROPE_TYPE_KEYS = {"linear": ((), ()), "llama3": (LLAMA3_ROPE_KEYS, ()),
                  "dynamic": (("original_max_position_embeddings",), ()),
                  "yarn": (("original_max_position_embeddings",), YARN_OPTIONAL_KEYS)}


@dataclass(frozen=True)
class RopeScaling(_Config):
    """ModelConfig.rope_scaling: the RoPE inverse frequencies rescaled as transformers does it.

    llama3:  {rope_type: llama3, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
             (Llama 3.1+: wavelengths above original / low_freq_factor divided by factor, below
             original / high_freq_factor kept, smoothly interpolated between).
    linear:  {rope_type: linear, factor} (every inverse frequency divided by factor).
    dynamic: {rope_type: dynamic, factor, original_max_position_embeddings} (dynamic NTK: a sequence
             of T > original positions uses the base theta (factor T / original - factor + 1)^(hd / (hd - 2));
             shorter ones plain RoPE; original is transformers' max_position_embeddings).
    yarn:    {rope_type: yarn, factor, original_max_position_embeddings, and optionally attention_factor,
             beta_fast (32), beta_slow (1), mscale, mscale_all_dim, truncate (true)} (YaRN: frequencies
             ramped between interpolated and kept, cos/sin multiplied by attention_factor, default
             0.1 ln(factor) + 1, or the ratio of the mscale terms when both are given).
    It depends on neither width nor depth: growth copies it to the grown model unchanged."""

    rope_type: Optional[str] = None
    factor: Optional[float] = None
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None
    attention_factor: Optional[float] = None
    beta_fast: Optional[float] = None
    beta_slow: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: Optional[bool] = None

    @classmethod
    def from_dict(cls, d: Any, where: str | None = None):
        return None if d is None else _from_dict(cls, d, where or "rope_scaling")

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def validate(self, where: str = "rope_scaling") -> None:
        what = "no rope_type" if self.rope_type is None else f"rope type {self.rope_type!r} is not supported"
        _need(self.rope_type in ROPE_SCALING_TYPES, where,
              f"{what} (supported: {', '.join(ROPE_SCALING_TYPES)}; leave rope_scaling out for plain RoPE)")
        _need(self.factor is not None and self.factor > 0, where, f"{self.rope_type} needs a positive factor, got {self.factor!r}")
        required, optional = ROPE_TYPE_KEYS[self.rope_type]
        others = [f.name for f in dataclasses.fields(self) if f.name not in ("rope_type", "factor") + required + optional]
        extra = [k for k in others if getattr(self, k) is not None]
        takes = ", ".join(("factor",) + required + optional)
        _need(not extra, where, f"{self.rope_type} takes {takes} only (given: {', '.join(extra)})")
        missing = [k for k in required if getattr(self, k) is None]
        _need(not missing, where, f"{self.rope_type} needs factor, {', '.join(required)} (missing: {', '.join(missing)})")
        if self.original_max_position_embeddings is not None:
            _need(_is_int(self.original_max_position_embeddings) and self.original_max_position_embeddings > 0, where,
                  f"original_max_position_embeddings must be a positive integer, got {self.original_max_position_embeddings!r}")
        if self.rope_type == "llama3":
            _need(0 < self.low_freq_factor < self.high_freq_factor, where,
                  f"llama3 needs 0 < low_freq_factor < high_freq_factor, got {self.low_freq_factor!r} and {self.high_freq_factor!r}")
        if self.rope_type in ("dynamic", "yarn"):
            _need(self.factor >= 1, where, f"{self.rope_type} needs factor >= 1 (it extends the context), got {self.factor!r}")
        if self.rope_type == "yarn":
            for k in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                v = getattr(self, k)
                _need(v is None or v > 0, where, f"yarn's {k} must be positive, got {v!r}")
            fast, slow = self.beta_fast or 32.0, self.beta_slow or 1.0
            _need(fast >= slow, where, f"yarn needs beta_fast >= beta_slow, got {fast!r} and {slow!r}")


@dataclass(frozen=True)
class ModelConfig(_Config):
    """A decoder-only transformer.

    gpt2:  LayerNorm, GELU MLP (fc1/fc2 with biases), learned positions, biases on linears.
    llama: RMSNorm, SwiGLU MLP (gate/up/down, no biases), rotary positions, no biases.
    """

    flavour: str = "gpt2"
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    head_dim: Optional[int] = None  # default d_model // n_heads; set it for an attention width != d_model
    # grouped-query attention (llama): key/value heads, each shared by n_heads / n_kv_heads query heads;
    # None (the default, and what n_kv_heads == n_heads is normalised to) = ordinary multi-head attention
    n_kv_heads: Optional[int] = None
    d_ff: Optional[int] = None  # default: 4*d_model (gpt2), 8/3*d_model rounded to 64 (llama)
    vocab_size: int = 8192  # the tokenizer's size; padded to VOCAB_MULTIPLE for the embedding
    seq_len: int = 128
    dropout: float = 0.0  # residual/embedding dropout (megagrow's own RNG); attention has none
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # llama: RoPE scaling (RopeScaling: llama3, linear, dynamic or yarn, as in transformers' rope_scaling); None = plain RoPE
    rope_scaling: Optional[RopeScaling] = field(default=None, metadata={"omit_if_none": True})
    # the positions the model takes (None: seq_len): gpt2 the rows of its learned position table (an imported
    # GPT-2 keeps all n_positions rows while training at a shorter seq_len), llama (RoPE, no table) the
    # max_position_embeddings its export writes. Never changed by growth.
    max_positions: Optional[int] = field(default=None, metadata={"omit_if_none": True})

    def __post_init__(self):
        # resolve the default head_dim once, so configs compare equal with or without it spelled out
        if self.head_dim is None and _is_int(self.d_model) and _is_int(self.n_heads) and self.n_heads > 0 \
                and self.d_model % self.n_heads == 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.n_kv_heads is not None and self.n_kv_heads == self.n_heads:
            object.__setattr__(self, "n_kv_heads", None)  # one spelling of multi-head attention
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):  # a dict (replace(), a constructor)
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling, "model.rope_scaling"))

    def validate(self, where: str = "model") -> None:
        _need(self.flavour in FLAVOURS, where, f"flavour must be one of {FLAVOURS}, got {self.flavour!r}")
        for k in ("n_layers", "d_model", "n_heads", "vocab_size", "seq_len"):
            v = getattr(self, k)
            _need(_is_int(v) and v > 0, where, f"{k} must be a positive integer, got {v!r}")
        _need(self.d_ff is None or (_is_int(self.d_ff) and self.d_ff > 0), where, f"d_ff must be a positive integer, got {self.d_ff!r}")
        _need(self.head_dim is not None, where, f"d_model {self.d_model} is not divisible by n_heads {self.n_heads} (or set head_dim)")
        _need(_is_int(self.head_dim) and self.head_dim > 0, where, f"head_dim must be a positive integer, got {self.head_dim!r}")
        _need(0.0 <= self.dropout < 1.0, where, f"dropout must be in [0, 1), got {self.dropout}")
        _need(self.init_std > 0, where, "init_std must be positive")
        if self.flavour == "llama":
            _need(self.head_dim % 2 == 0, where, f"llama (RoPE) needs an even head_dim, got {self.head_dim}")
        _need(self.max_positions is None or (_is_int(self.max_positions) and self.max_positions >= self.seq_len), where,
              f"max_positions must be an integer >= seq_len {self.seq_len} (or null: seq_len), got {self.max_positions!r}")
        _need(self.rope_scaling is None or self.flavour == "llama", where,
              "rope_scaling is for the llama flavour only (gpt2 has learned positions)")
        if self.n_kv_heads is not None:
            _need(_is_int(self.n_kv_heads) and self.n_kv_heads > 0, where, f"n_kv_heads must be a positive integer, got {self.n_kv_heads!r}")
            _need(self.flavour == "llama", where, "n_kv_heads (grouped-query attention) is for the llama flavour only")
            _need(self.n_heads % self.n_kv_heads == 0, where,
                  f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def attn_dim(self) -> int:
        """Width of the attention inner space: n_heads x head_dim (= d_model by default)."""
        return self.n_heads * self.head_dim

    @property
    def n_positions(self) -> int:
        """The positions the model takes: max_positions, else seq_len (gpt2: its position table's rows)."""
        return self.seq_len if self.max_positions is None else self.max_positions

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads for multi-head attention."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def kv_dim(self) -> int:
        """Rows of the K and V projections: kv_heads x head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.flavour == "llama":
            return 64 * ((8 * self.d_model // 3 + 63) // 64)
        return 4 * self.d_model

    @property
    def padded_vocab(self) -> int:
        return VOCAB_MULTIPLE * ((self.vocab_size + VOCAB_MULTIPLE - 1) // VOCAB_MULTIPLE)

    def num_params(self, embeddings: bool = True) -> int:
        """Exact parameter count of the logical model (megagrow.params' table; embeddings=False:
        without the token and position embeddings and the untied LM head)."""
        return _params.num_params(self, embeddings)


@dataclass(frozen=True)
class Layout(_Config):
    """How one stage runs: tensor parallel x data parallel, ZeRO stage, batch shape, precision."""

    tp: int = 1
    dp: int = 1
    zero_stage: int = 2
    micro_batch: int = 4
    grad_accum: int = 1
    dtype: str = "fp32"
    ds_config: Optional[str] = None  # extra DeepSpeed JSON (engine tuning), e.g. ds_configs/zero3.json

    def validate(self, where: str = "layout") -> None:
        for k in ("tp", "dp", "micro_batch", "grad_accum"):
            v = getattr(self, k)
            _need(_is_int(v) and v > 0, where, f"{k} must be a positive integer, got {v!r}")
        _need(self.zero_stage in (0, 1, 2, 3), where, f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        _need(self.dtype in DTYPES, where, f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.dp

    @property
    def global_batch(self) -> int:
        return self.dp * self.micro_batch * self.grad_accum

    def check_model(self, model: ModelConfig, where: str = "layout") -> None:
        """Cross-checks between a layout and the model it runs."""
        _need(model.n_heads % self.tp == 0, where, f"n_heads {model.n_heads} is not divisible by tp {self.tp}")
        kv = model.kv_heads  # split over TP ranks, or (tp > kv) each rank computes its group's K/V as Megatron does
        _need(kv % self.tp == 0 or (self.tp % kv == 0 and model.kv_dim % self.tp == 0), where,
              f"n_kv_heads {kv} and tp {self.tp}: tp must divide n_kv_heads, or be a multiple of it that divides "
              f"n_kv_heads x head_dim = {model.kv_dim}")
        _need(model.ffn_dim % self.tp == 0, where, f"d_ff {model.ffn_dim} is not divisible by tp {self.tp}")
        _need(VOCAB_MULTIPLE % self.tp == 0, where, f"tp {self.tp} must divide {VOCAB_MULTIPLE} (vocab padding)")

    def check_world(self, world_size: int, where: str = "layout") -> None:
        _need(
            world_size == self.world_size,
            where,
            f"world size {world_size} != tp {self.tp} x dp {self.dp} = {self.world_size}",
        )


@dataclass(frozen=True)
class OptimConfig(_Config):
    """AdamW with decoupled weight decay, global-norm clipping and a warmup + decay schedule."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    schedule: str = "cosine"
    decay_steps: Optional[int] = None  # schedule position of min_lr; default: where the stage ends (offset + steps)
    rewarmup_steps: int = 0  # after growth: linear ramp from 0 to the schedule over this many steps
    # after growth, where the grown stage sits on its schedule: "paper" = the source's position / c
    # (c = 1.776 width, 1.412 depth: the big model's equivalent step), "keep" = the source's position,
    # "restart" = 0 (a fresh schedule, warmup included); "auto" = restart after width growth, paper after
    # any other (width-grown models learn faster with a restarted schedule: docs/growth.md)
    lr_placement: str = "auto"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def validate(self, where: str = "optim") -> None:
        _need(self.lr > 0 and self.min_lr >= 0 and self.min_lr <= self.lr, where, "need 0 <= min_lr <= lr and lr > 0")
        _need(_is_int(self.warmup_steps) and self.warmup_steps >= 0, where, "warmup_steps must be >= 0")
        _need(_is_int(self.rewarmup_steps) and self.rewarmup_steps >= 0, where, "rewarmup_steps must be >= 0")
        _need(self.lr_placement in ("auto", "paper", "keep", "restart"), where,
              f"lr_placement must be auto, paper, keep or restart, got {self.lr_placement!r}")
        _need(self.schedule in LR_SCHEDULES, where, f"schedule must be one of {LR_SCHEDULES}, got {self.schedule!r}")
        _need(self.decay_steps is None or (_is_int(self.decay_steps) and self.decay_steps > 0), where, "decay_steps must be positive")
        _need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, where, "betas must be in [0, 1)")
        _need(self.eps > 0 and self.weight_decay >= 0 and self.grad_clip >= 0, where, "eps > 0, weight_decay >= 0, grad_clip >= 0")


@dataclass(frozen=True)
class DataConfig(_Config):
    """A memory-mapped token dataset (PREFIX.bin/.idx from tools/prepare_data.py)."""

    prefix: str = "data_cache/stdlib"

    def validate(self, where: str = "data") -> None:
        _need(isinstance(self.prefix, str) and self.prefix, where, "prefix must be a path prefix")


STOP_RULES = ("steps", "slope")


@dataclass(frozen=True)
class StopRule(_Config):
    """When a stage ends. "steps": after `steps` (the default). "slope": the practical rule of
    Shen et al. (2022) - end the stage early once the smoothed slope d log10 L / d log10 C of the
    validation loss (the logged training loss when the stage has no eval set) rises above
    `threshold` (megagrow.schedule.slope.SlopeRule: points more than `spike_tol` above the running
    minimum dropped, the slope of the last `window` kept points by `estimator` - Theil-Sen median
    or least squares -, optional EMA, `patience` points in a row), not before `min_steps`;
    `steps` stays the upper bound. threshold None: the paper's value for the next
    stage's operator (width -0.0475, depth -0.0575), or the stop value -0.052 for the last stage.
    C = 6 N (non-embedding) x tokens at the model's schedule position: a grown model counts from
    its equivalent step (megagrow/schedule/stop.py)."""

    rule: str = "steps"
    threshold: Optional[float] = None
    min_steps: int = 0
    window: int = 10
    ema: float = 0.0
    patience: int = 1
    spike_tol: Optional[float] = 0.01  # drop points > 1% above the running minimum (None: keep all)
    estimator: str = "theil-sen"  # or "lsq"

    def validate(self, where: str = "stop") -> None:
        _need(self.rule in STOP_RULES, where, f"rule must be one of {STOP_RULES}, got {self.rule!r}")
        _need(self.threshold is None or (isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool)),
              where, f"threshold must be a number, got {self.threshold!r}")
        _need(_is_int(self.min_steps) and self.min_steps >= 0, where, f"min_steps must be >= 0, got {self.min_steps!r}")
        _need(_is_int(self.window) and self.window >= 2, where, f"window must be an integer >= 2, got {self.window!r}")
        _need(isinstance(self.ema, (int, float)) and 0.0 <= self.ema < 1.0, where, f"ema must be in [0, 1), got {self.ema!r}")
        _need(_is_int(self.patience) and self.patience >= 1, where, f"patience must be an integer >= 1, got {self.patience!r}")
        _need(self.spike_tol is None or (isinstance(self.spike_tol, (int, float)) and not isinstance(self.spike_tol, bool)
                                         and 0.0 <= self.spike_tol < float("inf")),
              where, f"spike_tol must be a number >= 0 or null (filter off), got {self.spike_tol!r}")
        _need(self.estimator in ("theil-sen", "lsq"), where, f"estimator must be theil-sen or lsq, got {self.estimator!r}")


OPTIMIZER_STATE = ("moved", "reset")


@dataclass(frozen=True)
class GrowthOptions(_Config):
    """How the growth into this stage treats what it carries over (the ablation knobs).

    symmetry_breaking: width growth's loss-preserving noise, in units of init_std (0 = the
    copies stay identical, the reference code's behaviour); optimizer_state: "moved" (the Adam
    moments are grown with the weights and the step kept, megagrow's default) or "reset" (zero
    moments and step 0: a fresh optimizer on the grown weights)."""

    symmetry_breaking: float = 1.0
    optimizer_state: str = "moved"

    def validate(self, where: str = "growth") -> None:
        _need(self.symmetry_breaking >= 0, where, f"symmetry_breaking must be >= 0, got {self.symmetry_breaking!r}")
        _need(self.optimizer_state in OPTIMIZER_STATE, where,
              f"optimizer_state must be one of {', '.join(OPTIMIZER_STATE)}, got {self.optimizer_state!r}")


@dataclass(frozen=True)
class Stage(_Config):
    """One stage of a plan: a model, the layout it runs at, how long, and how it is logged/saved."""

    name: str = "stage"
    model: ModelConfig = field(default_factory=ModelConfig)
    layout: Layout = field(default_factory=Layout)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 100
    save_every: int = 50
    log_every: int = 10
    grow: Optional[str] = None  # growth operator that produced this stage from the previous one
    growth: GrowthOptions = field(default_factory=GrowthOptions)  # symmetry breaking, optimizer state moved/reset
    stop: StopRule = field(default_factory=StopRule)  # end at `steps`, or earlier by the slope rule
    # eval loss on the held-out split (PREFIX.valid): every `eval_every` steps (0: only at the stage
    # end and around growth), over `eval_tokens` held-out tokens (0: no eval at all)
    eval_every: int = 0
    eval_tokens: int = 65536
    # what each block recomputes in the backward pass instead of keeping its activations: "none", "attention"
    # (the norm + attention sublayer), "mlp" (the norm + MLP sublayer) or "full" (the whole block: least memory,
    # ~1/3 more compute; needs dropout 0). true / false (plans from when this was a boolean) read as full / none.
    activation_checkpointing: Any = "none"
    # Q, K, V (and llama's gate, up) projections each as one GEMM over the separate q/k/v parameters, one
    # input-gradient all-reduce under TP instead of three; the parameters, checkpoints and growth are unchanged
    fused_qkv: bool = True
    # torch.compile each transformer block before DeepSpeed takes the model: auto (on when the device is CUDA,
    # off on CPU), on, off. YAML's on / off (read as true / false) mean on / off. Not at ZeRO-3 (its parameter hooks)
    compile: Any = "auto"
    # the loss chunk by chunk over the tokens (no fp32 logits of the whole batch, megagrow/model/loss.py); false:
    # the whole batch's logits at once (to measure the difference)
    chunked_loss: bool = True
    # first stage only: start from a transformers model directory on disk ("hf:PATH") or a Megatron-LM checkpoint
    # ("megatron:PATH"): its weights, fresh optimizer state, at this stage's layout (megagrow.interop)
    init_from: Optional[str] = None
    # a hint, for advice only: the memory of one device in GB (e.g. 80). With it, a stage at tp > 1 whose
    # training state fits half of one device gets a warning (plan_warnings); without it that check is skipped
    device_memory_gb: Optional[float] = None

    def __post_init__(self):
        object.__setattr__(self, "activation_checkpointing", recompute_mode(self.activation_checkpointing))
        if isinstance(self.compile, bool):  # YAML 1.1 reads `compile: on` / `off` as true / false
            object.__setattr__(self, "compile", "on" if self.compile else "off")

    def validate(self, where: str = "stage") -> None:
        _need(isinstance(self.name, str) and self.name.replace("_", "").replace("-", "").isalnum(), where, f"name must be alphanumeric (with - or _), got {self.name!r}")
        for k in ("steps", "save_every", "log_every"):
            v = getattr(self, k)
            _need(_is_int(v) and v > 0, where, f"{k} must be a positive integer, got {v!r}")
        for k in ("eval_every", "eval_tokens"):
            v = getattr(self, k)
            _need(_is_int(v) and v >= 0, where, f"{k} must be an integer >= 0, got {v!r}")
        _need(isinstance(self.activation_checkpointing, str) and self.activation_checkpointing in RECOMPUTE, where,
              f"activation_checkpointing must be one of {', '.join(RECOMPUTE)} (or true / false), got {self.activation_checkpointing!r}")
        _need(self.activation_checkpointing != "full" or self.model.dropout == 0.0, where,
              "activation_checkpointing full needs model.dropout 0 (a recomputed block would draw other dropout masks; "
              "attention and mlp keep the dropout outside what they recompute)")
        _need(self.compile in COMPILE, where, f"compile must be one of {', '.join(COMPILE)}, got {self.compile!r}")
        _need(not (self.compile == "on" and self.layout.zero_stage == 3), where,
              "compile on needs zero_stage 1 or 2 (ZeRO-3 gathers parameters in hooks inside each block); use auto or off")
        self.layout.check_model(self.model, f"{where}.layout")
        _need(self.stop.min_steps <= self.steps, f"{where}.stop", f"min_steps {self.stop.min_steps} > steps {self.steps}")
        _need(self.init_from is None or (self.init_from.partition(":")[0] in ("hf", "megatron") and self.init_from.partition(":")[2]),
              where, f"init_from must be hf:PATH (a transformers model directory) or megatron:PATH (a Megatron-LM "
              f"checkpoint directory), got {self.init_from!r}")
        _need(self.device_memory_gb is None or self.device_memory_gb > 0, where,
              f"device_memory_gb must be a positive number of GB or null, got {self.device_memory_gb!r}")


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
    def from_dict(cls, d: Any, where: str | None = None) -> "Plan":
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
        return {"name": self.name, "seed": self.seed, "data": self.data.to_dict(), "stages": [s.to_dict() for s in self.stages],
                "reliability": self.reliability.to_dict()}

    def validate(self, where: str = "plan") -> None:
        _need(_is_int(self.seed) and self.seed >= 0, where, "seed must be a non-negative integer")
        names = [s.name for s in self.stages]
        _need(len(set(names)) == len(names), where, f"stage names must be unique, got {names}")
        later = [s.name for s in self.stages[1:] if s.init_from is not None]
        _need(not later, where, f"only the first stage may have init_from (stage(s) {', '.join(later)} grow from the one before)")
        for s in self.stages[1:]:  # no growth operator changes the RoPE scaling (it depends on neither width nor depth)
            _need(s.model.rope_scaling == self.stages[0].model.rope_scaling, where,
                  f"stage {s.name}: rope_scaling {_plain(s.model.rope_scaling)} differs from stage {self.stages[0].name}'s "
                  f"{_plain(self.stages[0].model.rope_scaling)} (growth keeps it: give every stage the same, e.g. in defaults)")

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


# training-state bytes per parameter: fp32 weights (master) + fp32 Adam moments + fp32 gradients (bf16
# accumulates them in fp32 too), + the bf16 weights the model computes with in bf16
STATE_BYTES = {"fp32": 4 + 8 + 4, "bf16": 4 + 8 + 4 + 2}


def stage_warnings(stage: Stage) -> list[str]:
    """One-line advice on a stage's layout; nothing here is an error (load_plan prints them)."""
    L, out = stage.layout, []
    if L.zero_stage == 2 and L.dp == 1:
        out.append("zero_stage 2 at dp 1 partitions nothing and pays per-gradient hooks (2.3x ZeRO-1's step time "
                   "measured on an H100, bench/gpu/README.md): use zero_stage 1")
    if L.tp > 1 and stage.device_memory_gb:
        gb = stage.model.num_params() * STATE_BYTES[L.dtype] / 1e9
        if gb <= 0.5 * stage.device_memory_gb:
            out.append(f"tp {L.tp}: the model's training state ({gb:.1f} GB: {STATE_BYTES[L.dtype]} bytes/parameter, "
                       f"{L.dtype}) fits in half of one {stage.device_memory_gb:g} GB device; tp 1 (more dp, or ZeRO) "
                       "avoids tensor parallelism's all-reduces in every layer")
    return out


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


_SUBCONFIGS = {
    ("Stage", "growth"): GrowthOptions,
    ("Stage", "model"): ModelConfig,
    ("ModelConfig", "rope_scaling"): RopeScaling,
    ("Stage", "layout"): Layout,
    ("Stage", "optim"): OptimConfig,
    ("Stage", "stop"): StopRule,
    ("Plan", "data"): DataConfig,
    ("Plan", "reliability"): Reliability,
}


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


# ---- plan overrides: `--set stages.wide.optim.lr=2e-3 --set reliability.keep_last=3` on the command line.
# KEY is a dotted path into the plan as written in YAML: a top-level section (reliability, data, defaults, name,
# seed), or stages.S.... where S is a stage's name, its 0-based index, or * (every stage). VALUE is read as YAML
# (2e-3, true, null, text). The key is checked against the config fields before anything is applied; the value
# is validated with the whole plan, exactly as if it had been written in the file.


def parse_override(text: str) -> tuple[list[str], Any]:
    """"a.b.c=VALUE" -> (["a", "b", "c"], VALUE read as YAML)."""
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
            raise UserError(f"--set {shown}: unknown key {part!r} " + (f"in {'.'.join(path[:i])}" if i else "at the top level")
                            + f" (allowed: {', '.join(names + ['defaults'] if top else names)})")
        sub = _SUBCONFIGS.get((cls.__name__, part))
        if sub is None and i < len(path) - 1:
            raise UserError(f"--set {shown}: {'.'.join(path[:i + 1])} is a value, not a section")
        cls = sub


def _put(d: dict, path: list[str], value: Any, shown: str) -> None:
    """d[path[0]][path[1]]... = value, making the mappings the file left out."""
    for i, part in enumerate(path[:-1]):
        if d.get(part) is None:
            d[part] = {}
        if not isinstance(d[part], dict):
            raise UserError(f"--set {shown}: {'.'.join(path[:i + 1])} in the plan is not a mapping")
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
    raise UserError(f"--set {shown}: the plan has no stage {which!r} (stages: {', '.join(names)}; or an index 0.."
                    f"{len(stages) - 1}, or *)")


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

