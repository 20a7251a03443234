"""The model's config: ModelConfig (flavour, shape, vocabulary, positions) and its RoPE scaling
(RopeScaling: llama3, linear, dynamic, yarn as in transformers' rope_scaling), with their checks.
Layout-free: nothing here depends on how a stage is parallelised (megagrow/config/stage.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megagrow import params as _params
from megagrow.config.base import _Config, _from_dict, _is_int, _need

FLAVOURS = ("gpt2", "llama")
VOCAB_MULTIPLE = 128  # vocab padded to a multiple of this, independent of TP (layout-free)

ROPE_SCALING_TYPES = ("llama3", "linear", "dynamic", "yarn")  # RopeScaling.rope_type (None: plain RoPE, no rope_scaling)
LLAMA3_ROPE_KEYS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
YARN_OPTIONAL_KEYS = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")
# the settings each type takes besides rope_type and factor: (required, optional)
ROPE_TYPE_KEYS = {
    "linear": ((), ()),
    "llama3": (LLAMA3_ROPE_KEYS, ()),
    "dynamic": (("original_max_position_embeddings",), ()),
    "yarn": (("original_max_position_embeddings",), YARN_OPTIONAL_KEYS),
}


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

    rope_type: str | None = None
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str | None = None):
        return None if d is None else _from_dict(cls, d, where or "rope_scaling")

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def validate(self, where: str = "rope_scaling") -> None:
        what = "no rope_type" if self.rope_type is None else f"rope type {self.rope_type!r} is not supported"
        _need(
            self.rope_type in ROPE_SCALING_TYPES,
            where,
            f"{what} (supported: {', '.join(ROPE_SCALING_TYPES)}; leave rope_scaling out for plain RoPE)",
        )
        _need(self.factor is not None and self.factor > 0, where, f"{self.rope_type} needs a positive factor, got {self.factor!r}")
        required, optional = ROPE_TYPE_KEYS[self.rope_type]
        others = [f.name for f in dataclasses.fields(self) if f.name not in ("rope_type", "factor") + required + optional]
        extra = [k for k in others if getattr(self, k) is not None]
        takes = ", ".join(("factor",) + required + optional)
        _need(not extra, where, f"{self.rope_type} takes {takes} only (given: {', '.join(extra)})")
        missing = [k for k in required if getattr(self, k) is None]
        _need(not missing, where, f"{self.rope_type} needs factor, {', '.join(required)} (missing: {', '.join(missing)})")
        if self.original_max_position_embeddings is not None:
            _need(
                _is_int(self.original_max_position_embeddings) and self.original_max_position_embeddings > 0,
                where,
                f"original_max_position_embeddings must be a positive integer, got {self.original_max_position_embeddings!r}",
            )
        if self.rope_type == "llama3":
            _need(
                0 < self.low_freq_factor < self.high_freq_factor,
                where,
                f"llama3 needs 0 < low_freq_factor < high_freq_factor, got {self.low_freq_factor!r} and {self.high_freq_factor!r}",
            )
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
    head_dim: int | None = None  # default d_model // n_heads; set it for an attention width != d_model
    # grouped-query attention (llama): key/value heads, each shared by n_heads / n_kv_heads query heads;
    # None (the default, and what n_kv_heads == n_heads is normalised to) = ordinary multi-head attention
    n_kv_heads: int | None = None
    d_ff: int | None = None  # default: 4*d_model (gpt2), 8/3*d_model rounded to 64 (llama)
    vocab_size: int = 8192  # the tokenizer's size; padded to VOCAB_MULTIPLE for the embedding
    seq_len: int = 128
    dropout: float = 0.0  # residual/embedding dropout (megagrow's own RNG); attention has none
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # llama: RoPE scaling (RopeScaling: llama3, linear, dynamic or yarn, as in transformers' rope_scaling); None = plain RoPE
    rope_scaling: RopeScaling | None = field(default=None, metadata={"omit_if_none": True})
    # the positions the model takes (None: seq_len): gpt2 the rows of its learned position table (an imported
    # GPT-2 keeps all n_positions rows while training at a shorter seq_len), llama (RoPE, no table) the
    # max_position_embeddings its export writes. Never changed by growth.
    max_positions: int | None = field(default=None, metadata={"omit_if_none": True})

    def __post_init__(self):
        # resolve the default head_dim once, so configs compare equal with or without it spelled out
        if (
            self.head_dim is None
            and _is_int(self.d_model)
            and _is_int(self.n_heads)
            and self.n_heads > 0
            and self.d_model % self.n_heads == 0
        ):
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
        _need(
            self.max_positions is None or (_is_int(self.max_positions) and self.max_positions >= self.seq_len),
            where,
            f"max_positions must be an integer >= seq_len {self.seq_len} (or null: seq_len), got {self.max_positions!r}",
        )
        _need(
            self.rope_scaling is None or self.flavour == "llama",
            where,
            "rope_scaling is for the llama flavour only (gpt2 has learned positions)",
        )
        if self.n_kv_heads is not None:
            _need(
                _is_int(self.n_kv_heads) and self.n_kv_heads > 0, where, f"n_kv_heads must be a positive integer, got {self.n_kv_heads!r}"
            )
            _need(self.flavour == "llama", where, "n_kv_heads (grouped-query attention) is for the llama flavour only")
            _need(self.n_heads % self.n_kv_heads == 0, where, f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

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
