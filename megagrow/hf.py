"""Hugging Face transformers <-> megagrow: configs, weights, tokenizers (the `hf` extra:
transformers, safetensors; `megagrow export-hf` is megagrow/export_cli.py, `init_from: hf:PATH`
starts a plan's first stage through `import_checkpoint`).

megagrow's gpt2 flavour computes the same function as transformers' GPT2LMHeadModel and its
llama flavour as LlamaForCausalLM (rotate-half RoPE, RMSNorm, SwiGLU, grouped-query
attention), once the weights are mapped:

    megagrow (y = W x, W is out x in)        GPT2LMHeadModel
    tok_emb.weight[:vocab]                   transformer.wte.weight
    pos_emb.weight                           transformer.wpe.weight
    blocks.i.ln1 / ln2                       transformer.h.i.ln_1 / ln_2
    cat(attn.q, attn.k, attn.v).T            transformer.h.i.attn.c_attn  (Conv1D: in x out)
    attn.o.T, mlp.fc1.T, mlp.fc2.T           attn.c_proj, mlp.c_fc, mlp.c_proj (Conv1D)
    ln_f                                     transformer.ln_f
    lm_head.weight[:vocab] (untied only)     lm_head.weight

    megagrow                                 LlamaForCausalLM
    tok_emb.weight[:vocab]                   model.embed_tokens.weight
    blocks.i.ln1 / ln2                       model.layers.i.input_layernorm / post_attention_layernorm
    blocks.i.attn.q / k / v / o              model.layers.i.self_attn.q_proj / k_proj / v_proj / o_proj
    blocks.i.mlp.gate / up / down            model.layers.i.mlp.gate_proj / up_proj / down_proj
    ln_f                                     model.norm
    lm_head.weight[:vocab] (untied only)     lm_head.weight

No permutation of Q/K rows is needed: both sides use the rotate-half RoPE layout. megagrow
pads the vocabulary to a multiple of 128 rows; export drops the padding, import pads with
zero rows (their logits are 0: the logits of the real vocabulary are unchanged).
Config fields: norm_eps <-> layer_norm_epsilon / rms_norm_eps (transformers' Llama default is
1e-6, megagrow's 1e-5: the value is always written out and read back, never assumed),
rope_theta <-> rope_parameters.rope_theta (and top-level rope_theta), rope_scaling (llama3, linear) <->
rope_parameters (5.x) / rope_scaling (4.x), n_kv_heads <-> num_key_value_heads,
head_dim <-> head_dim, d_ff <-> n_inner / intermediate_size, tie_embeddings <-> tie_word_embeddings.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Callable, Iterator

from megagrow.config import LLAMA3_ROPE_KEYS, ROPE_SCALING_TYPES, ModelConfig, RopeScaling
from megagrow.errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are made: reading configs stays light (the controller checks
    import torch   # init_from before it launches anything, without loading torch)

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def need_hf() -> None:
    """UserError unless transformers and safetensors are importable (the `hf` extra)."""
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise UserError(f"Hugging Face interop needs transformers and safetensors ({e.name} is missing): "
                        "pip install 'megagrow[hf]'") from None


# ---------------------------------------------------------------------------------------
# configs


def check_exportable(m: ModelConfig) -> None:
    if m.flavour == "gpt2" and m.attn_dim != m.d_model:
        raise UserError(f"GPT2LMHeadModel needs n_heads x head_dim == d_model; this model has {m.n_heads} x {m.head_dim} "
                        f"!= {m.d_model} (after heads growth), which transformers' GPT-2 cannot represent")


def hf_config(m: ModelConfig, bos_id: int | None = None, eos_id: int | None = None, n_positions: int | None = None):
    """The transformers config object of model `m` (vocabulary without megagrow's padding).
    n_positions: the model's position capacity (GPT-2: the rows of its position table), default seq_len."""
    need_hf()
    check_exportable(m)
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id}  # None without a tokenizer (not GPT-2's 50256)
    n_positions = n_positions or m.seq_len
    if m.flavour == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=m.vocab_size, n_positions=n_positions, n_embd=m.d_model, n_layer=m.n_layers,
                          n_head=m.n_heads, n_inner=m.ffn_dim, activation_function="gelu_new",
                          resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=0.0,
                          layer_norm_epsilon=m.norm_eps, initializer_range=m.init_std,
                          tie_word_embeddings=m.tie_embeddings, architectures=[ARCHITECTURES["gpt2"]], **ids)
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim,
                       num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads,
                       head_dim=m.head_dim, max_position_embeddings=n_positions, rms_norm_eps=m.norm_eps,
                       rope_theta=m.rope_theta, hidden_act="silu", attention_bias=False, mlp_bias=False,
                       initializer_range=m.init_std, tie_word_embeddings=m.tie_embeddings,
                       architectures=[ARCHITECTURES["llama"]], **ids, **_rope_kwargs(m))


def hf_rope_scaling(m: ModelConfig) -> dict | None:
    """transformers' rope_scaling dict of model `m` (4.x's spelling: rope_type and its parameters, no
    rope_theta), None for plain RoPE."""
    if m.rope_scaling is None:
        return None
    d = m.rope_scaling.to_dict()
    d["factor"] = float(d["factor"])
    if m.rope_scaling.rope_type == "llama3":
        d["low_freq_factor"], d["high_freq_factor"] = float(d["low_freq_factor"]), float(d["high_freq_factor"])
    return d


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
    `type`) beside a top-level rope_theta. Types other than default, llama3 and linear: one-line UserError."""
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
    keys = ("factor",) + (LLAMA3_ROPE_KEYS if kind == "llama3" else ())
    d = {"rope_type": kind, **{k: rp.get(k) for k in keys}}
    if kind == "llama3" and d["original_max_position_embeddings"] is None:  # transformers' fallback
        d["original_max_position_embeddings"] = cfg.get("max_position_embeddings")
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
        return dict(flavour="gpt2", n_layers=int(cfg["n_layer"]), d_model=d, n_heads=h, head_dim=d // h, n_kv_heads=None,
                    d_ff=int(cfg.get("n_inner") or 4 * d), vocab_size=int(cfg["vocab_size"]),
                    tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                    norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), _positions=int(cfg["n_positions"]))
    if arch == ARCHITECTURES["llama"] or (arch is None and kind == "llama"):
        if cfg.get("hidden_act", "silu") != "silu":
            raise UserError(f"{where}: activation {cfg.get('hidden_act')!r} is not supported (SwiGLU with silu only)")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise UserError(f"{where}: attention_bias / mlp_bias are not supported (megagrow's llama has no biases)")
        d, h = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or h)
        theta, scaling = _rope(cfg, where)
        return dict(flavour="llama", n_layers=int(cfg["num_hidden_layers"]), d_model=d, n_heads=h,
                    head_dim=int(cfg.get("head_dim") or d // h), n_kv_heads=None if kv == h else kv,
                    d_ff=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
                    tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                    norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                    _positions=int(cfg.get("max_position_embeddings") or 0))
    raise UserError(f"{where}: architecture {arch or kind!r} is not supported (GPT2LMHeadModel or LlamaForCausalLM)")


def check_matches(hf: dict, m: ModelConfig, where: str, stage: str) -> None:
    """One-line UserError unless the stage's model is the transformers model (sizes, flavour, tied or not)."""
    if hf["vocab_size"] > m.vocab_size:
        raise UserError(f"{where} has a vocab of {hf['vocab_size']}, larger than the vocab_size {m.vocab_size} of stage {stage!r}")
    mine = dict(flavour=m.flavour, n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads, head_dim=m.head_dim,
                n_kv_heads=m.n_kv_heads, d_ff=m.ffn_dim, vocab_size=m.vocab_size, tie_embeddings=m.tie_embeddings,
                norm_eps=m.norm_eps)
    if m.flavour == "llama":
        mine["rope_theta"], mine["rope_scaling"] = m.rope_theta, m.rope_scaling
    shown = lambda v: v.to_dict() if isinstance(v, RopeScaling) else v  # noqa: E731
    diff = [f"{k} {shown(hf[k])!r} (stage: {shown(v)!r})" for k, v in mine.items() if k in hf and hf[k] != v
            and not (isinstance(v, float) and abs(hf[k] - v) <= 1e-12 * max(1.0, abs(v)))]
    if diff:
        raise UserError(f"{where} does not match the model of stage {stage!r}: " + ", ".join(diff))
    if m.flavour == "gpt2" and hf["_positions"] < m.seq_len:
        raise UserError(f"{where} has {hf['_positions']} positions, fewer than the seq_len {m.seq_len} of stage {stage!r}")


# ---------------------------------------------------------------------------------------
# weights


def to_hf(m: ModelConfig, read: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, tensor) of every weight of model `m`; `read(name)` gives megagrow's
    logical fp32 tensor `name` (called once per name). Vocabulary padding dropped."""
    import torch

    V = m.vocab_size
    if m.flavour == "gpt2":
        yield "transformer.wte.weight", read("tok_emb.weight")[:V]
        yield "transformer.wpe.weight", read("pos_emb.weight")
        for i in range(m.n_layers):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            yield h + "ln_1.weight", read(b + "ln1.weight")
            yield h + "ln_1.bias", read(b + "ln1.bias")
            yield h + "attn.c_attn.weight", torch.cat([read(b + f"attn.{p}.weight") for p in "qkv"], 0).t()
            yield h + "attn.c_attn.bias", torch.cat([read(b + f"attn.{p}.bias") for p in "qkv"], 0)
            yield h + "attn.c_proj.weight", read(b + "attn.o.weight").t()
            yield h + "attn.c_proj.bias", read(b + "attn.o.bias")
            yield h + "ln_2.weight", read(b + "ln2.weight")
            yield h + "ln_2.bias", read(b + "ln2.bias")
            yield h + "mlp.c_fc.weight", read(b + "mlp.fc1.weight").t()
            yield h + "mlp.c_fc.bias", read(b + "mlp.fc1.bias")
            yield h + "mlp.c_proj.weight", read(b + "mlp.fc2.weight").t()
            yield h + "mlp.c_proj.bias", read(b + "mlp.fc2.bias")
        yield "transformer.ln_f.weight", read("ln_f.weight")
        yield "transformer.ln_f.bias", read("ln_f.bias")
    else:
        yield "model.embed_tokens.weight", read("tok_emb.weight")[:V]
        for i in range(m.n_layers):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            yield h + "input_layernorm.weight", read(b + "ln1.weight")
            for p in "qkvo":
                yield h + f"self_attn.{p}_proj.weight", read(b + f"attn.{p}.weight")
            yield h + "post_attention_layernorm.weight", read(b + "ln2.weight")
            for p in ("gate", "up", "down"):
                yield h + f"mlp.{p}_proj.weight", read(b + f"mlp.{p}.weight")
        yield "model.norm.weight", read("ln_f.weight")
    if not m.tie_embeddings:
        yield "lm_head.weight", read("lm_head.weight")[:V]


def from_hf(m: ModelConfig, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """megagrow's logical fp32 tensors of model `m` from a transformers state dict (`get(name)`);
    the vocabulary padded with zero rows, GPT-2's position table cut to seq_len."""
    import torch

    def pad(t):
        out = torch.zeros(m.padded_vocab, t.shape[1], dtype=torch.float32)
        out[:t.shape[0]] = t
        return out

    P: dict[str, torch.Tensor] = {}
    if m.flavour == "gpt2":
        P["tok_emb.weight"] = pad(get("transformer.wte.weight"))
        P["pos_emb.weight"] = get("transformer.wpe.weight")[:m.seq_len]
        A = m.attn_dim
        for i in range(m.n_layers):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            P[b + "ln1.weight"], P[b + "ln1.bias"] = get(h + "ln_1.weight"), get(h + "ln_1.bias")
            w, bias = get(h + "attn.c_attn.weight").t(), get(h + "attn.c_attn.bias")
            for j, p in enumerate("qkv"):
                P[b + f"attn.{p}.weight"], P[b + f"attn.{p}.bias"] = w[j * A:(j + 1) * A], bias[j * A:(j + 1) * A]
            P[b + "attn.o.weight"], P[b + "attn.o.bias"] = get(h + "attn.c_proj.weight").t(), get(h + "attn.c_proj.bias")
            P[b + "ln2.weight"], P[b + "ln2.bias"] = get(h + "ln_2.weight"), get(h + "ln_2.bias")
            P[b + "mlp.fc1.weight"], P[b + "mlp.fc1.bias"] = get(h + "mlp.c_fc.weight").t(), get(h + "mlp.c_fc.bias")
            P[b + "mlp.fc2.weight"], P[b + "mlp.fc2.bias"] = get(h + "mlp.c_proj.weight").t(), get(h + "mlp.c_proj.bias")
        P["ln_f.weight"], P["ln_f.bias"] = get("transformer.ln_f.weight"), get("transformer.ln_f.bias")
    else:
        P["tok_emb.weight"] = pad(get("model.embed_tokens.weight"))
        for i in range(m.n_layers):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            P[b + "ln1.weight"] = get(h + "input_layernorm.weight")
            for p in "qkvo":
                P[b + f"attn.{p}.weight"] = get(h + f"self_attn.{p}_proj.weight")
            P[b + "ln2.weight"] = get(h + "post_attention_layernorm.weight")
            for p in ("gate", "up", "down"):
                P[b + f"mlp.{p}.weight"] = get(h + f"mlp.{p}_proj.weight")
        P["ln_f.weight"] = get("model.norm.weight")
    if not m.tie_embeddings:
        P["lm_head.weight"] = pad(get("lm_head.weight"))
    return {n: t.float().contiguous() for n, t in P.items()}


def read_hf_dir(path: str) -> tuple[dict, dict, dict]:
    """(config.json, the ModelConfig fields it fixes, {weight name or None: weights file}) of a
    transformers model directory: safetensors (one file or sharded with an index), else PyTorch
    pytorch_model.bin (likewise); json and os only (no torch, no transformers)."""
    if not os.path.isdir(path):
        raise UserError(f"transformers model directory not found: {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{path}: no config.json (not a transformers model directory)")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
        fields = model_fields_from_hf(config, path)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{cfg_path}: not a readable transformers config ({type(e).__name__}: {e})") from None
    for single, index in (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        single, index = os.path.join(path, single), os.path.join(path, index)
        if os.path.isfile(single):
            return config, fields, {None: single}
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    wm = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise UserError(f"{index}: not a readable weights index ({type(e).__name__}: {e})") from None
            return config, fields, {n: os.path.join(path, fn) for n, fn in wm.items()}
    raise UserError(f"{path}: no model.safetensors, pytorch_model.bin or index of either (model.safetensors.index.json, pytorch_model.bin.index.json)")


def check_init_from(stage) -> None:
    """The checks of a stage's `init_from: hf:PATH` that need no weights: the directory, its
    config against the stage's model, a weights file. UserError naming the first problem."""
    path = parse_init_from(stage.init_from)
    _, fields, _ = read_hf_dir(path)
    check_matches(fields, stage.model, path, stage.name)


class _TorchFile:
    """A pytorch_model.bin read like a safetensors file: torch.load with weights_only=True (tensors
    and plain containers only: no code in the file runs) and mmap=True (tensors are read from the
    file as used, not all into memory at once)."""

    def __init__(self, fn: str):
        import torch

        sd = torch.load(fn, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(sd, dict):
            raise ValueError(f"holds a {type(sd).__name__}, not a state dict")
        self.sd = sd

    def keys(self):
        return self.sd.keys()

    def get_tensor(self, name: str):
        return self.sd[name]


class HFCheckpoint:
    """A transformers model directory on disk: config.json + model.safetensors or pytorch_model.bin
    (or sharded, with an index). Tensors are read one at a time (both memory-mapped)."""

    def __init__(self, path: str):
        need_hf()
        self.path = path
        self.config, self.fields, self.files = read_hf_dir(path)
        self._open: dict = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        fn = self.files.get(name, self.files.get(None))
        if fn is None or not os.path.isfile(fn):
            raise UserError(f"{self.path}: weight {name} is missing" + (f" (file {fn} not found)" if fn else ""))
        if fn not in self._open:
            try:
                self._open[fn] = _TorchFile(fn) if fn.endswith(".bin") else safe_open(fn, framework="pt")
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file
                raise UserError(f"cannot read {fn}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        f = self._open[fn]
        if name not in f.keys():
            raise UserError(f"{self.path}: weight {name} is missing from {os.path.basename(fn)}")
        return f.get_tensor(name)

    def tensors_for(self, m: ModelConfig, stage: str = "?") -> dict[str, torch.Tensor]:
        """megagrow's logical tensors for stage model `m` (checked against config.json and shapes)."""
        from megagrow.growth.ops import logical_tensors

        check_matches(self.fields, m, self.path, stage)
        P = from_hf(m, self.get)
        for n, s in logical_tensors(m).items():
            if tuple(P[n].shape) != tuple(s):
                raise UserError(f"{self.path}: weight for {n} has shape {tuple(P[n].shape)}, the config says {tuple(s)}")
        return P


# ---------------------------------------------------------------------------------------
# tokenizers


EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")


def load_tokenizer_object(path: str):
    """(tokenizers.Tokenizer, {unk/bos/eos token strings}) from a sentencepiece .model (converted
    following the model's own normalizer settings, so it encodes exactly like sentencepiece)
    or from a tokenizer.json."""
    need_hf()
    if not os.path.isfile(path):
        raise UserError(f"tokenizer not found: {path}")
    if path.endswith(".json"):
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"not a tokenizer.json: {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        vocab = tok.get_vocab(with_added_tokens=True)
        special = {"eos_token": next((t for t in EOS_NAMES if t in vocab), None),
                   "bos_token": next((t for t in BOS_NAMES if t in vocab), None)}
        return tok, {k: v for k, v in special.items() if v}
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = pb.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise UserError(f"not a sentencepiece model: {path}") from None
    if not proto.pieces:
        raise UserError(f"not a sentencepiece model: {path}")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM, BPE
        raise UserError(f"{path}: sentencepiece model type {proto.trainer_spec.model_type} is not supported (BPE or unigram)")
    if proto.trainer_spec.model_type == 1:
        tok = SpmConverter.build_tokenizer_from_spm_proto(proto, [(p.piece, p.score) for p in proto.pieces], legacy=False)
    else:
        tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
    ts = proto.trainer_spec
    special = {"unk_token": ts.unk_piece if ts.unk_id >= 0 else None, "bos_token": ts.bos_piece if ts.bos_id >= 0 else None,
               "eos_token": ts.eos_piece if ts.eos_id >= 0 else None}
    return tok, {k: v for k, v in special.items() if v}


TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # the tokenizer.json class of transformers 4.x; 5.x maps it to TokenizersBackend


def write_tokenizer(path: str, out_dir: str, model_vocab: int, model_max_length: int | None = None) -> dict:
    """Write `path` (sentencepiece .model or tokenizer.json) into `out_dir` as a tokenizer that
    transformers' AutoTokenizer 4.x and 5.x load (tokenizer.json + tokenizer_config.json naming
    PreTrainedTokenizerFast; a .model is also copied as tokenizer.model). model_max_length: the
    model's position capacity, so that truncation=True cuts to what the model can take.
    Returns {vocab_size, bos_token_id, eos_token_id, source}."""
    import shutil

    from transformers import PreTrainedTokenizerFast

    tok, special = load_tokenizer_object(path)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > model_vocab:
        raise UserError(f"tokenizer {path} has {n} tokens, more than the model's vocab_size {model_vocab}")
    extra = {} if model_max_length is None else {"model_max_length": int(model_max_length)}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special, **extra)
    fast.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        tc = json.load(f)
    tc["tokenizer_class"] = TOKENIZER_CLASS  # 5.x writes its own name, TokenizersBackend, which 4.x cannot load
    with open(cfg_path, "w") as f:
        json.dump(tc, f, indent=2, sort_keys=True)
        f.write("\n")
    if not path.endswith(".json"):
        shutil.copyfile(path, os.path.join(out_dir, "tokenizer.model"))
    return {"source": os.path.abspath(path), "vocab_size": n, "bos_token_id": fast.bos_token_id,
            "eos_token_id": fast.eos_token_id}


# ---------------------------------------------------------------------------------------
# import: a transformers model as a stage's first checkpoint


class _Zeros:
    """old[name][slices] -> zeros: the (fresh) Adam moments of an imported model."""

    def __init__(self, params: dict):
        self.params = params

    def __contains__(self, name):
        return name in self.params

    def __getitem__(self, name):
        import torch

        t = self.params[name]

        class _View:
            def __getitem__(self, slices):
                return torch.zeros_like(t[slices])

        return _View()


class WeightsSource:
    """In-memory logical weights with the reading interface of a SourceCheckpoint that the
    shard-to-shard executor fills an engine from: weights as given, Adam moments zero, step 0."""

    def __init__(self, params: dict):
        self.params = params
        self.bytes_read = 0

    def lazy(self, state: str):
        return self.params if state == "w" else _Zeros(self.params)

    def adam_step(self) -> int:
        return 0


def parse_init_from(spec: str) -> str:
    """The directory of an `init_from: hf:PATH` spec."""
    if not isinstance(spec, str) or not spec.startswith("hf:") or len(spec) <= 3:
        raise UserError(f"init_from must be hf:PATH (a transformers model directory), got {spec!r}")
    return os.path.expanduser(spec[3:])


def import_checkpoint(plan, k: int, out_dir: str, progress: bool = False) -> dict:
    """Stage k's step-0 checkpoint in `out_dir`, at its layout, from the transformers model its
    `init_from: hf:PATH` names: weights only (Adam moments zero, step 0, data position 0).
    Every rank reads the tensors it needs from the weights files (memory-mapped) and
    fills its own fragments through the shard-to-shard executor; DeepSpeed writes the files.
    Process groups must be initialised for stage k's layout."""
    import torch

    from megagrow import collectives
    from megagrow.growth.ops import Identity, plan_growth
    from megagrow.parallel.engine import build_stage
    from megagrow.paths import tag_of
    from megagrow.state.executor import fill_engine, init_optimizer_state
    from megagrow.state.record import StageRecord

    stage = plan.stages[k]
    path = parse_init_from(stage.init_from)
    hf = HFCheckpoint(path)
    params = hf.tensors_for(stage.model, stage.name)
    gp = plan_growth(Identity(), stage.model)
    engine, optimizer = build_stage(plan, k, init=False)  # every weight is written below
    init_optimizer_state(engine, optimizer)
    info = fill_engine(engine, gp.tensors, WeightsSource(params), plan.seed, progress)
    cs = StageRecord(plan, k).to_client_state()  # step 0, data position 0, schedule from its start
    cs["init_from"] = {"hf": os.path.abspath(path), "config": hf.config}
    engine.global_steps = 0
    engine.save_checkpoint(out_dir, tag=tag_of(0), client_state=cs)
    collectives.barrier()
    del engine, optimizer
    return {"init_from": os.path.abspath(path), "tag": tag_of(0), **info}
