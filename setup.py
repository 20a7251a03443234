import sys

from setuptools import find_packages, setup

# megatron-core 0.16.x is the newest release for Python 3.11; 0.17+ need Python 3.12.
megatron = "megatron-core==0.16.1" if sys.version_info < (3, 12) else "megatron-core>=0.16.1,<0.18"

HF = ["transformers>=5.24,<6", "safetensors>=0.6", "tokenizers>=0.22", "protobuf>=4"]

setup(
    name="megagrow",
    version="0.1.0",
    description="Staged training of transformer language models: grow width and depth, keep training.",
    packages=find_packages(include=["megagrow", "megagrow.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch==2.13.0",
        "deepspeed==0.19.8",
        megatron,
        "psutil>=5.9",  # megatron-core imports it without declaring it
        "einops>=0.7",
        "numpy>=1.26",
        "sentencepiece==0.2.*",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "scipy>=1.11",
        "matplotlib>=3.7",  # megagrow plot (Agg backend, no display)
    ],
    # NVIDIA apex is an optional GPU extra, detected at run time. Never PyPI's `apex`
    # (an unrelated package that also breaks megatron-core's CPU path).
    # hf: Hugging Face interop (megagrow export-hf, init_from: hf:PATH, tokenizer.json for prepare_data.py);
    # protobuf reads sentencepiece models for the tokenizer.json conversion. The test extra installs it,
    # so the interop tests run (never skipped) wherever the tests run; tensorboard: event files beside log.jsonl.
    extras_require={
        "hf": HF,
        # ruff: `make lint` (lint and format check), run by CI before the tests
        "test": ["pytest>=8", "tensorboard>=2.14", "ruff==0.17.6", *HF],
    },
    entry_points={"console_scripts": ["megagrow=megagrow.cli:main"]},
)
