"""FP8 (e4m3) block-quantised weights, as DeepSeek publishes them (`inference.md` §e).

A quantised matrix W [M,N] is stored as `weight` (float8_e4m3fn) plus `weight_scale_inv` (fp32,
[ceil(M/128), ceil(N/128)]); the "inv" is already the multiplier: W[i,j] = Wq[i,j] · S[i//128, j//128].
Edge blocks are scaled as if zero-padded to 128.

Two implementations of the dequantisation, kept side by side (`style.md` §9 rule 6):
`weight_dequant_reference` (one block at a time, reads like the formula) and `weight_dequant`
(one vectorised multiply over a padded block view). Both run on CPU; no Triton, no GPU needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def _check(w: torch.Tensor, s: torch.Tensor, block: int) -> None:
    M, N = w.shape
    want = (-(-M // block), -(-N // block))
    if tuple(s.shape) != want:
        raise ValueError(f"scale shape {tuple(s.shape)} does not match weight {tuple(w.shape)} in {block}x{block} blocks (expected {want})")


def weight_dequant_reference(w: torch.Tensor, s: torch.Tensor, block: int = BLOCK, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Reference: multiply each block of w [M,N] by its scale, one block at a time."""
    _check(w, s, block)
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            rows, cols = slice(bi * block, (bi + 1) * block), slice(bj * block, (bj + 1) * block)
            out[rows, cols] = w[rows, cols].float() * s[bi, bj].float()
    return out.to(dtype)


def weight_dequant(w: torch.Tensor, s: torch.Tensor, block: int = BLOCK, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Fast path: pad w to whole blocks, view as [Mb,128,Nb,128], multiply by s[:,None,:,None], crop."""
    _check(w, s, block)
    M, N = w.shape
    Mb, Nb = s.shape
    x = F.pad(w.float(), (0, Nb * block - N, 0, Mb * block - M))
    x = x.view(Mb, block, Nb, block) * s.float()[:, None, :, None]
    return x.view(Mb * block, Nb * block)[:M, :N].to(dtype)


SCALE_FMTS = (None, "ue8m0")
"""Block-scale formats: None (any fp32 amax/448, V3) or "ue8m0" (powers of two, V3.1's
`quantization_config.scale_fmt`: an 8-bit exponent with no mantissa, what DeepGEMM's UE8M0 kernels read)."""


def ue8m0(s: torch.Tensor) -> torch.Tensor:
    """Round positive scales UP to the next power of two (so |w| / s still fits the e4m3 range)."""
    return torch.exp2(torch.ceil(torch.log2(s)))


def weight_quant(w: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantise w [M,N] to (float8_e4m3fn [M,N], fp32 scale_inv [Mb,Nb]) with amax/448 scales
    (rounded up to powers of two with `scale_fmt="ue8m0"`).

    The inverse of `weight_dequant` up to FP8 rounding; used by `dsv3 convert --to fp8`.
    """
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt {scale_fmt!r}: expected one of {SCALE_FMTS}")
    M, N = w.shape
    Mb, Nb = -(-M // block), -(-N // block)
    x = F.pad(w.float(), (0, Nb * block - N, 0, Mb * block - M)).view(Mb, block, Nb, block)
    s = x.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # [Mb,Nb]
    if scale_fmt == "ue8m0":
        s = ue8m0(s)
    q = (x / s[:, None, :, None]).view(Mb * block, Nb * block)[:M, :N].to(torch.float8_e4m3fn)
    return q.contiguous(), s
