"""Hugging Face transformers <-> megagrow: configs, weights, tokenizers (the `hf` extra:
transformers, safetensors; `megagrow export-hf` is megagrow/cli/export.py, `init_from: hf:PATH`
starts a plan's first stage through `import_checkpoint`). This module gathers the names of
megagrow/interop/: hf_config.py (configs), hf_weights.py (weights, import), hf_tokenizer.py,
hf_export.py (sharded safetensors writing).

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
rope_theta <-> rope_parameters.rope_theta (and top-level rope_theta), rope_scaling (llama3, linear,
dynamic, yarn) <-> rope_parameters (5.x) / rope_scaling (4.x), n_positions (max_positions, else seq_len)
<-> n_positions / max_position_embeddings (dynamic RoPE: its original context), n_kv_heads <-> num_key_value_heads,
head_dim <-> head_dim, d_ff <-> n_inner / intermediate_size, tie_embeddings <-> tie_word_embeddings.
"""

from megagrow.interop.hf_config import (  # noqa: F401
    ARCHITECTURES,
    ROPE_IMPORTABLE,
    check_exportable,
    check_matches,
    hf_config,
    hf_rope_scaling,
    model_fields_from_hf,
    need_hf,
    portable_config,
    set_dtype,
    write_config,
)
from megagrow.interop.hf_tokenizer import BOS_NAMES, EOS_NAMES, TOKENIZER_CLASS, load_tokenizer_object, write_tokenizer  # noqa: F401
from megagrow.interop.hf_weights import (  # noqa: F401
    HFCheckpoint,
    WeightsSource,
    check_init_from,
    from_hf,
    import_checkpoint,
    parse_init_from,
    read_hf_dir,
    to_hf,
)
