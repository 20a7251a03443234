"""Rotary position embeddings (llama flavour): the inverse frequencies, with the scalings
transformers defines (linear, dynamic NTK, llama3, yarn), the cos/sin tables and their
application to queries and keys (rotate-half convention)."""

from __future__ import annotations

import math

import torch

from megagrow.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None, seq_len: int | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies (hd/2,), float64: theta^(-2i/hd), rescaled by `scaling`
    (ModelConfig.rope_scaling) as transformers' modeling_rope_utils does for the same rope_type:
      linear  every frequency divided by factor;
      llama3  wavelengths 2 pi / f above original / low_freq_factor: f / factor; below
              original / high_freq_factor: f; between: (1 - s) f / factor + s f with
              s = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor);
      dynamic (NTK) for a sequence of seq_len > original positions the base theta becomes
              theta (factor seq_len / original - factor + 1)^(hd / (hd - 2)); shorter (or None): plain;
      yarn    f / factor and f mixed by a linear ramp over the dimensions between the correction
              range of beta_fast and beta_slow rotations (kept above it, interpolated below it)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv
    kind = scaling.rope_type
    if kind == "linear":
        return inv / scaling.factor
    if kind == "llama3":
        factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
        original = scaling.original_max_position_embeddings
        wavelen = 2 * math.pi / inv
        smooth = (original / wavelen - low) / (high - low)
        out = torch.where(wavelen > original / low, inv / factor, inv)
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, (1 - smooth) * inv / factor + smooth * inv, out)
    if kind == "dynamic":
        original = scaling.original_max_position_embeddings
        if seq_len is None or seq_len <= original:
            return inv
        base = theta * (scaling.factor * seq_len / original - (scaling.factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if kind == "yarn":
        return _yarn_inv_freq(inv, head_dim, theta, scaling)
    raise ValueError(f"rope type {kind!r} is not supported")  # config validation refuses it first


def _yarn_inv_freq(inv: torch.Tensor, head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """YaRN's frequencies (transformers' _compute_yarn_parameters): dimension d of the correction
    range [low, high] (where the original context makes beta_fast .. beta_slow rotations) ramps
    from the kept frequency (below low) to the interpolated f / factor (above high)."""
    original = scaling.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast or 32.0), correction_dim(scaling.beta_slow or 1.0)
    if scaling.truncate is None or scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    return inv / scaling.factor * (1 - keep) + inv * keep


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """The factor cos and sin are multiplied by (so attention logits by its square): yarn's
    attention_factor, by default 0.1 ln(factor) + 1, or with mscale and mscale_all_dim both given
    the ratio of those terms (transformers' yarn_get_mscale); 1 for every other RoPE."""
    if scaling is None or scaling.rope_type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return mscale(scaling.factor, scaling.mscale) / mscale(scaling.factor, scaling.mscale_all_dim)
    return mscale(scaling.factor)


def rope_tables(seq_len: int, head_dim: int, theta: float, scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (seq_len, hd), float32, of positions 0 .. seq_len - 1, for a sequence of seq_len
    positions (dynamic scaling depends on it), multiplied by rope_attention_factor (yarn)."""
    inv = rope_inv_freq(head_dim, theta, scaling, seq_len)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)  # (T, hd/2)
    ang = torch.cat([ang, ang], dim=-1)
    af = rope_attention_factor(scaling)
    if af == 1.0:
        return ang.cos().float(), ang.sin().float()
    return (ang.cos() * af).float(), (ang.sin() * af).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on (B, H, T, hd)."""
    T = x.shape[-2]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos[:T] + rotated * sin[:T]).to(x.dtype)
