"""FP8 (e4m3) quantise-dequantise of activations, for the paths that emulate FP8 products exactly:
the values are those an FP8 kernel would multiply, the product itself then runs in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.checkpoint.fp8 import BLOCK, FP8_MAX


def qdq_tiles(x: torch.Tensor, tile: int = BLOCK) -> torch.Tensor:
    """Quantise x [..., K] to e4m3 per 1 x `tile` group of its last dim (amax / 448 scales) and back."""
    K = x.shape[-1]
    pad = (-K) % tile
    xf = F.pad(x.float(), (0, pad)).reshape(*x.shape[:-1], (K + pad) // tile, tile)  # explicit: x may have 0 rows
    s = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    q = (xf / s).to(torch.float8_e4m3fn).float() * s
    return q.reshape(*x.shape[:-1], K + pad)[..., :K].to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] times the orthonormal Walsh-Hadamard matrix H_n / sqrt(n) (n a power of two): the
    rotation DeepSeek's V3.2 indexer applies before quantising (it spreads outliers over all dims and,
    being orthogonal, keeps every dot product)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two width, got {n}")
    y = x.float().reshape(-1, n)
    h = 1
    while h < n:  # the fast transform: butterflies of width 2h
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return (y.reshape(x.shape) * n ** -0.5).to(x.dtype)
