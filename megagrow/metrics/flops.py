"""One FLOP convention for every run, and the device peaks MFU is measured against.

Training FLOPs per token (megagrow's ledger, as torchtitan and llm-foundry report MFU):

    6 * N + 12 * L * a * s

N the non-embedding parameters (ModelConfig.num_params(embeddings=False): every block and the
final norm; no token/position embedding, no output head), L layers, a the attention width
(n_heads x head_dim, = d_model by default), s the sequence length. 6N is forward (2N) plus
backward (4N) of every weight matrix; 12*L*a*s is QK^T and AV (2 * 2 * s * a per layer
forward, x3 with backward), counted in full: no halving for the causal mask, no recompute, no
logit layer.

Megatron-LM's count (Narayanan et al. 2021, appendix; `num_floating_point_operations` in
Megatron-LM) is given beside it in `megagrow bench`; it adds the output logit GEMM:

    12 * L * h^2 * [ (1 + k/n + s/h) * a/h  +  (f/h) * g  +  V / (2 * L * h) ]   per token

h = d_model, n heads of which k key/value heads (grouped-query attention; k = n otherwise), f
the FFN width, g = 3/2 for SwiGLU (llama) else 1, V the padded vocab.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from megagrow.config import ModelConfig, Stage

# dense (no sparsity) peak TFLOP/s per device, by precision. fp32 is the plain FP32 rate (torch
# keeps TF32 off for matmuls by default); bf16 the tensor-core rate.
PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.2},
    "H200": {"bf16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp32": 19.5},
}
PEAK_ENV = "MEGAGROW_PEAK_TFLOPS"  # overrides the table (e.g. another GPU, or a measured peak)


def flops_per_token(m: ModelConfig) -> int:
    """Training FLOPs per token on megagrow's convention: 6 N_nonembedding + 12 L a s."""
    return 6 * m.num_params(embeddings=False) + 12 * m.n_layers * m.attn_dim * m.seq_len


def logit_flops_per_token(m: ModelConfig) -> int:
    """Training FLOPs per token of the output logit GEMM (d_model x padded vocab, tied or not),
    which the ledger leaves out: 2 V h forward, 4 V h backward. Large at small sizes (about
    V / (12 L h) of the ledger's 6N), negligible at billions of parameters."""
    return 6 * m.d_model * m.padded_vocab


def megatron_flops_per_token(m: ModelConfig) -> float:
    """Training FLOPs per token by Megatron-LM's formula (no MoE in megagrow's models)."""
    h, s, L = m.d_model, m.seq_len, m.n_layers
    gated = 1.5 if m.flavour == "llama" else 1.0
    attn = (1 + m.kv_heads / m.n_heads + s / h) * (m.attn_dim / h)
    mlp = (m.ffn_dim / h) * gated
    logit = m.padded_vocab / (2 * L * h)
    return 12 * L * h * h * (attn + mlp + logit)


def device_name(device) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return "cpu"


def table_key(name: str) -> str | None:
    """The PEAK_TFLOPS row of a device name as CUDA reports it (None: not in the table)."""
    n = name.upper()
    if "H200" in n:
        return "H200"
    if "H100" in n:
        return "H100 PCIe" if "PCIE" in n else "H100 SXM"  # "NVIDIA H100 80GB HBM3" is the SXM part
    if "A100" in n:
        return "A100"
    return None


def peak_tflops(device, dtype: str, override: float | None = None) -> float | None:
    """Peak TFLOP/s of one device for `dtype` ("fp32" | "bf16"); None when unknown (CPU, or a GPU
    not in the table) unless `override` or $MEGAGROW_PEAK_TFLOPS gives it."""
    if override is not None:
        return float(override)
    env = os.environ.get(PEAK_ENV)
    if env:
        try:
            return float(env)
        except ValueError:
            from megagrow.errors import UserError

            raise UserError(f"${PEAK_ENV} must be a number of TFLOP/s, got {env!r}") from None
    key = table_key(device_name(device))
    return None if key is None else PEAK_TFLOPS[key][dtype]


@dataclass(frozen=True)
class Ledger:
    """Cumulative training tokens and FLOPs of a whole run at step `step` of one stage: the stage's
    step 0 starts where the previous stage ended (`tokens0`, `flops0`, carried in the stage record
    over growth and resume), and each step adds global_batch x seq_len tokens."""

    tokens0: int
    flops0: int
    tokens_per_step: int
    flops_per_step: int

    @classmethod
    def of(cls, stage: Stage, tokens0: int = 0, flops0: int = 0) -> Ledger:
        t = stage.layout.global_batch * stage.model.seq_len
        return cls(int(tokens0), int(flops0), t, t * flops_per_token(stage.model))

    def tokens(self, step: int) -> int:
        return self.tokens0 + step * self.tokens_per_step

    def flops(self, step: int) -> int:
        return self.flops0 + step * self.flops_per_step


def throughput(stage: Stage, step_time_s: float, world_size: int, peak: float | None) -> dict:
    """tokens/s, TFLOP/s per device and MFU of one step of `stage` that took `step_time_s`."""
    tokens = stage.layout.global_batch * stage.model.seq_len
    tps = tokens / step_time_s
    tflops = tps * flops_per_token(stage.model) / world_size / 1e12
    return {"tokens_per_s": tps, "tflops_per_device": tflops, "mfu": None if not peak else tflops / peak}


def peak_memory_gb(device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak resident set size on CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
