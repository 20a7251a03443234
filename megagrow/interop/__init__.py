"""Interoperability with other tools' formats.

- megagrow.interop.hf: Hugging Face transformers (GPT2LMHeadModel, LlamaForCausalLM) export
  and import, safetensors weights, sentencepiece tokenizers as tokenizer.json
- megagrow.interop.export_cli: `megagrow export-hf` / tools/export_hf.py

Needs the `hf` extra (transformers, safetensors); the rest of megagrow does not import it.
"""
