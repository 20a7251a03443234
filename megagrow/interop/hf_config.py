"""transformers configs <-> megagrow's ModelConfig (json only: no torch, no transformers until
a config object is made). The weight mapping is in megagrow/interop/hf_weights.py."""

from __future__ import annotations

import json
import os

from megagrow.config import ROPE_SCALING_TYPES, ROPE_TYPE_KEYS, ModelConfig, RopeScaling
from megagrow.errors import UserError

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def need_hf() -> None:
    """UserError unless transformers and safetensors are importable (the `hf` extra)."""
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"Hugging Face interop needs transformers and safetensors ({e.name} is missing): pip install 'megagrow[hf]'"
        ) from None


# ---------------------------------------------------------------------------------------
# configs


def check_exportable(m: ModelConfig) -> None:
    if m.flavour == "gpt2" and m.attn_dim != m.d_model:
        raise UserError(
            f"GPT2LMHeadModel needs n_heads x head_dim == d_model; this model has {m.n_heads} x {m.head_dim} "
            f"!= {m.d_model} (after heads growth), which transformers' GPT-2 cannot represent"
        )


def hf_config(m: ModelConfig, bos_id: int | None = None, eos_id: int | None = None, n_positions: int | None = None):
    """The transformers config object of model `m` (vocabulary without megagrow's padding).
    n_positions: the model's position capacity (GPT-2: the rows of its position table), default m.n_positions."""
    need_hf()
    check_exportable(m)
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id}  # None without a tokenizer (not GPT-2's 50256)
    n_positions = n_positions or m.n_positions
    if m.flavour == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=m.vocab_size,
            n_positions=n_positions,
            n_embd=m.d_model,
            n_layer=m.n_layers,
            n_head=m.n_heads,
            n_inner=m.ffn_dim,
            activation_function="gelu_new",
            resid_pdrop=m.dropout,
            embd_pdrop=m.dropout,
            attn_pdrop=0.0,
            layer_norm_epsilon=m.norm_eps,
            initializer_range=m.init_std,
            tie_word_embeddings=m.tie_embeddings,
            architectures=[ARCHITECTURES["gpt2"]],
            **ids,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        intermediate_size=m.ffn_dim,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.kv_heads,
        head_dim=m.head_dim,
        max_position_embeddings=hf_max_positions(m, n_positions),
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        initializer_range=m.init_std,
        tie_word_embeddings=m.tie_embeddings,
        architectures=[ARCHITECTURES["llama"]],
        **ids,
        **_rope_kwargs(m),
    )


def hf_rope_scaling(m: ModelConfig) -> dict | None:
    """transformers' rope_scaling dict of model `m` (4.x's spelling: rope_type and its parameters, no
    rope_theta), None for plain RoPE."""
    if m.rope_scaling is None:
        return None
    d = {
        k: float(v) if isinstance(v, int) and k != "original_max_position_embeddings" and not isinstance(v, bool) else v
        for k, v in m.rope_scaling.to_dict().items()
    }
    if m.rope_scaling.rope_type == "dynamic":  # transformers' dynamic takes its original context from max_position_embeddings
        d.pop("original_max_position_embeddings")
    return d


def hf_max_positions(m: ModelConfig, n_positions: int) -> int:
    """max_position_embeddings of model `m`'s config: its position capacity `n_positions`, except
    under dynamic RoPE scaling, where transformers reads the original context (the length above
    which the base grows) from it."""
    rs = m.rope_scaling
    return rs.original_max_position_embeddings if rs is not None and rs.rope_type == "dynamic" else n_positions


def _rope_kwargs(m: ModelConfig) -> dict:
    # rope_scaling= is 4.x's keyword; 5.x reads it into rope_parameters (with rope_theta). Plain RoPE: none.
    rs = hf_rope_scaling(m)
    return {} if rs is None else {"rope_scaling": rs}


def set_dtype(cfg, dtype: str) -> None:
    """Record the weights' dtype ("float32", ...) in a transformers config: `dtype` where the installed
    transformers has it (there `torch_dtype` is a deprecated alias that says so), else `torch_dtype`."""
    if isinstance(getattr(type(cfg), "torch_dtype", None), property):
        cfg.dtype = dtype
    else:
        cfg.torch_dtype = dtype


def portable_config(cfg, m: ModelConfig) -> dict:
    """config.json's content for `cfg` (hf_config of `m`) that transformers 4.x and 5.x read alike.
    transformers 5 writes RoPE settings only inside `rope_parameters` and the dtype as `dtype`;
    4.x reads the top-level `rope_theta` (without it, silently 10000) and `torch_dtype`. Both
    spellings are written; each version ignores the one it does not know."""
    d = cfg.to_diff_dict()  # what save_pretrained writes: the non-default fields
    if m.flavour == "llama":
        d["rope_theta"] = float(m.rope_theta)
        rs = hf_rope_scaling(m)
        if rs is None:
            d.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": float(m.rope_theta)})
        else:  # RoPE scaling in both spellings: 5.x reads rope_parameters, 4.x rope_scaling
            d["rope_parameters"] = {**rs, "rope_theta": float(m.rope_theta)}
            d["rope_scaling"] = rs
    dt = d.get("dtype", d.get("torch_dtype"))
    if dt is not None:
        d["dtype"] = d["torch_dtype"] = str(dt).replace("torch.", "")
    return d


def write_config(cfg, m: ModelConfig, out_dir: str) -> dict:
    """config.json (portable_config) and generation_config.json (the token ids a generate() call
    needs: bos, eos) of model `m` in `out_dir`. Returns the config written."""
    from transformers import GenerationConfig

    d = portable_config(cfg, m)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")
    gen = {"bos_token_id": d.get("bos_token_id"), "eos_token_id": d.get("eos_token_id")}
    GenerationConfig(**{k: v for k, v in gen.items() if v is not None}).save_pretrained(out_dir)
    return d


ROPE_IMPORTABLE = ("default",) + ROPE_SCALING_TYPES


def _rope(cfg: dict, where: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, rope_scaling) of a Llama config.json: transformers 5.x's rope_parameters (rope_type,
    rope_theta and the scaling parameters in one dict), else 4.x's rope_scaling (rope_type, or the older
    `type`) beside a top-level rope_theta. Types other than default, llama3, linear, dynamic and yarn:
    one-line UserError. dynamic's original context is max_position_embeddings (as transformers reads it);
    llama3's and yarn's original_max_position_embeddings falls back to it."""
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    supported = f"supported: {', '.join(ROPE_IMPORTABLE)}"
    if not isinstance(rp, dict) or any(isinstance(v, dict) for v in rp.values()):
        raise UserError(f"{where}: rope_parameters / rope_scaling {rp!r} is not supported (one RoPE for every layer; {supported})")
    kind = rp.get("rope_type", rp.get("type", "default"))
    theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if kind in (None, "default"):
        return theta, None
    if kind not in ROPE_SCALING_TYPES:
        raise UserError(f"{where}: rope type {kind!r} is not supported ({supported})")
    partial = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise UserError(f"{where}: partial_rotary_factor {partial!r} is not supported (megagrow rotates the whole head)")
    required, optional = ROPE_TYPE_KEYS[kind]
    d = {"rope_type": kind, **{k: rp.get(k) for k in ("factor",) + required + optional if rp.get(k) is not None}}
    if kind == "dynamic" or (kind in ("llama3", "yarn") and d.get("original_max_position_embeddings") is None):
        d["original_max_position_embeddings"] = cfg.get("max_position_embeddings")  # transformers' reading
    return theta, RopeScaling.from_dict(d, f"{where}: rope scaling")


def model_fields_from_hf(cfg: dict, where: str) -> dict:
    """ModelConfig fields that a transformers config.json fixes (the architecture)."""
    arch = (cfg.get("architectures") or [None])[0]
    kind = cfg.get("model_type")
    if arch == ARCHITECTURES["gpt2"] or (arch is None and kind == "gpt2"):
        if cfg.get("activation_function", "gelu_new") not in _TANH_GELU:
            raise UserError(f"{where}: activation {cfg.get('activation_function')!r} is not supported (GPT-2's tanh GELU only)")
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("scale_attn_weights") is False:
            raise UserError(f"{where}: non-standard GPT-2 attention scaling is not supported")
        d, h = int(cfg["n_embd"]), int(cfg["n_head"])
        return dict(
            flavour="gpt2",
            n_layers=int(cfg["n_layer"]),
            d_model=d,
            n_heads=h,
            head_dim=d // h,
            n_kv_heads=None,
            d_ff=int(cfg.get("n_inner") or 4 * d),
            vocab_size=int(cfg["vocab_size"]),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
            _positions=int(cfg["n_positions"]),
        )
    if arch == ARCHITECTURES["llama"] or (arch is None and kind == "llama"):
        if cfg.get("hidden_act", "silu") != "silu":
            raise UserError(f"{where}: activation {cfg.get('hidden_act')!r} is not supported (SwiGLU with silu only)")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise UserError(f"{where}: attention_bias / mlp_bias are not supported (megagrow's llama has no biases)")
        d, h = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or h)
        theta, scaling = _rope(cfg, where)
        return dict(
            flavour="llama",
            n_layers=int(cfg["num_hidden_layers"]),
            d_model=d,
            n_heads=h,
            head_dim=int(cfg.get("head_dim") or d // h),
            n_kv_heads=None if kv == h else kv,
            d_ff=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            _positions=int(cfg.get("max_position_embeddings") or 0),
        )
    raise UserError(f"{where}: architecture {arch or kind!r} is not supported (GPT2LMHeadModel or LlamaForCausalLM)")


def check_matches(hf: dict, m: ModelConfig, where: str, stage: str) -> None:
    """One-line UserError unless the stage's model is the transformers model (sizes, flavour, tied or not)."""
    if hf["vocab_size"] > m.vocab_size:
        raise UserError(f"{where} has a vocab of {hf['vocab_size']}, larger than the vocab_size {m.vocab_size} of stage {stage!r}")
    mine = dict(
        flavour=m.flavour,
        n_layers=m.n_layers,
        d_model=m.d_model,
        n_heads=m.n_heads,
        head_dim=m.head_dim,
        n_kv_heads=m.n_kv_heads,
        d_ff=m.ffn_dim,
        vocab_size=m.vocab_size,
        tie_embeddings=m.tie_embeddings,
        norm_eps=m.norm_eps,
    )
    if m.flavour == "llama":
        mine["rope_theta"], mine["rope_scaling"] = m.rope_theta, m.rope_scaling
    shown = lambda v: v.to_dict() if isinstance(v, RopeScaling) else v  # noqa: E731
    diff = [
        f"{k} {shown(hf[k])!r} (stage: {shown(v)!r})"
        for k, v in mine.items()
        if k in hf and hf[k] != v and not (isinstance(v, float) and abs(hf[k] - v) <= 1e-12 * max(1.0, abs(v)))
    ]
    if diff:
        raise UserError(f"{where} does not match the model of stage {stage!r}: " + ", ".join(diff))
    if m.flavour == "gpt2" and hf["_positions"] < m.n_positions:
        what = f"max_positions {m.max_positions}" if m.max_positions is not None else f"seq_len {m.seq_len}"
        raise UserError(f"{where} has {hf['_positions']} positions, fewer than the {what} of stage {stage!r}")
