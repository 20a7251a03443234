"""megatron-core's GPTModel (local layer spec) as the reference a megagrow model converted to Megatron-LM's format
is checked against, on the CPU (tests/unit/test_megatron_export.py, tests/dist/hf_sharded_worker.py)."""

from __future__ import annotations

import torch

from megagrow.config import ModelConfig


def megatron_gpt(m: ModelConfig):
    """megatron-core's GPTModel of model `m` (local layer spec, CPU, fp32), configured from megagrow's config the
    way megatron_args tells Megatron-LM to (RMSNorm + SwiGLU + RoPE without biases, or LayerNorm + tanh GELU +
    learned positions with biases)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    llama = m.flavour == "llama"
    cfg = TransformerConfig(
        num_layers=m.n_layers,
        hidden_size=m.d_model,
        ffn_hidden_size=m.ffn_dim,
        num_attention_heads=m.n_heads,
        num_query_groups=m.kv_heads,
        kv_channels=m.head_dim,
        layernorm_epsilon=m.norm_eps,
        normalization="RMSNorm" if llama else "LayerNorm",
        gated_linear_unit=llama,
        add_bias_linear=not llama,
        activation_func=F.silu if llama else (lambda x: F.gelu(x, approximate="tanh")),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    spec = get_gpt_layer_local_spec(normalization="RMSNorm" if llama else "LayerNorm")
    return GPTModel(
        cfg,
        spec,
        vocab_size=m.padded_vocab,
        max_sequence_length=m.n_positions,
        position_embedding_type="rope" if llama else "learned_absolute",
        rotary_base=int(m.rope_theta),
        share_embeddings_and_output_weights=m.tie_embeddings,
    ).eval()


def megatron_logits(model, x: torch.Tensor) -> torch.Tensor:
    """megatron-core's own forward of token ids x (B, T) on the CPU: logits (B, T, padded vocab). Its forward asks
    for a CUDA device where it has no CPU branch (RotaryEmbedding.get_emb, GlobalMemoryBuffer.get_tensor, the
    default causal mask): the causal mask is passed explicitly, megatron-core's inference RNG tracker replaces the
    CUDA RNG states, and torch.cuda.current_device answers the CPU during the call (restored after)."""
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    T = x.shape[1]
    saved = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("cpu")
    try:
        with torch.no_grad():
            return model(
                x,
                torch.arange(T).expand(x.shape[0], T),
                attention_mask=torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)[None, None],
            )
    finally:
        torch.cuda.current_device = saved
