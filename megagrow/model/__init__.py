"""The GPT model (gpt2 and llama flavours) on megatron-core tensor-parallel layers."""

from megagrow.nocompile import megatron_core

megatron_core()  # before the model imports megatron-core: see megagrow/nocompile.py

from megagrow.model.gpt import GPT, build_model  # noqa: E402

__all__ = ["GPT", "build_model"]
