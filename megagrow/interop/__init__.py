"""Other tools' model formats: Hugging Face transformers (hf_config, hf_weights, hf_tokenizer,
hf_export; `megagrow.hf` gathers their names) and Megatron-LM checkpoints (megatron)."""
