"""Rotary position embedding with YaRN frequencies, applied to INTERLEAVED pairs.

DeepSeek rotates element pairs (2i, 2i+1) of the 64 rope dims by angle pos·inv_freq[i]
(the official code uses complex numbers). The rotated output keeps the interleaved layout, so the
cached k_pe and the query q_pe always agree.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv3.config.schema import ModelConfig, yarn_mscale


def yarn_inv_freq(dim: int, base: float, factor: float, original_max_pos: int, beta_fast: float, beta_slow: float,
                  truncate: bool = True) -> torch.Tensor:
    """YaRN inverse frequencies [dim/2]: extrapolate high-frequency dims, interpolate low ones by `factor`."""

    def corr_dim(rot: float) -> float:
        return dim * math.log(original_max_pos / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrap = 1.0 / pos_freqs
    interp = 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 -> keep the original (extrapolated) frequency
    return interp * (1 - keep) + extrap * keep


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape [..., T, R/2] for given positions; YaRN when configured."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim, base, rs = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling
        if rs is None:
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.attention_scaling = 1.0
        else:
            inv_freq = yarn_inv_freq(dim, base, rs.factor, rs.original_max_position_embeddings, rs.beta_fast, rs.beta_slow, rs.truncate)
            # cos/sin amplitude as HF computes it: mscale/mscale_all_dim (1.0 for V3's config).
            if rs.attention_factor is not None:
                self.attention_scaling = rs.attention_factor
            elif rs.mscale and rs.mscale_all_dim:
                self.attention_scaling = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
            else:
                self.attention_scaling = yarn_mscale(rs.factor)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # Keep inv_freq in fp32 whatever dtype the model is cast to: in bf16 (8-bit mantissa) the
        # angles pos·inv_freq drift by whole radians at long positions.
        inv_freq = self.inv_freq
        out = super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = inv_freq.to(self.inv_freq.device)  # the fp32 original, on the new device
        return out

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] (int) -> cos, sin [..., T, R/2] in fp32."""
        freqs = positions[..., None].float() * self.inv_freq.float()
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of x [..., T, (H,) R] with cos/sin [..., T, R/2].

    cos/sin must already be broadcastable to x[..., ::2] (insert a head axis before calling if needed).
    """
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # [..., R/2, 2]
    return out.flatten(-2).to(x.dtype)
