"""The GPT model (gpt2 and llama flavours) on megatron-core tensor-parallel layers."""

from megagrow.model.gpt import GPT, build_model

__all__ = ["GPT", "build_model"]
