"""FP8 block GEMM on CUDA: DeepSeek-V3's own inference recipe (`inference/kernel.py`: `act_quant`
then `fp8_gemm`) through torch's `F.scaled_mm`.

Activations are quantised per token and 128-column block to float8_e4m3fn (scale = amax / 448, the
same rule as the weights); the weights stay as stored in the checkpoint (float8_e4m3fn with one fp32
`weight_scale_inv` per 128x128 block); cuBLASLt multiplies the FP8 operands with both block scales
(BlockWise1x128 x BlockWise128x128, Hopper-class GPUs, CUDA >= 12.9) and accumulates in fp32.

Used by `Fp8Block.linear` (`dsv3.quant.schemes`) on CUDA when `fp8_gemm_supported` says this device
runs it and gets the reference's numbers (a probe on first use); every other case dequantises per
block (the CPU path), and which path a device takes is logged once. Reference for the tests:
`fp8_block_linear_reference`, the same activation quantisation, then dequantise both and multiply in fp32.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from dsv3.checkpoint.fp8 import BLOCK, weight_dequant, weight_quant

FP8_MAX = 448.0
log = logging.getLogger(__name__)


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of 128) -> (float8_e4m3fn [M, K], fp32 scales [M, K/128])."""
    M, K = x.shape
    xb = x.float().view(M, K // BLOCK, BLOCK)
    s = xb.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    return (xb / s[..., None]).to(torch.float8_e4m3fn).view(M, K), s


def shape_eligible(n: int, k: int) -> bool:
    """Whole 128-blocks in both dimensions and a K-block count cuBLASLt's block-scale layout takes."""
    return n % BLOCK == 0 and k % BLOCK == 0 and (k // BLOCK) % 4 == 0


def fp8_block_linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ dequant(q [N, K], s [N/128, K/128])ᵀ on the FP8 tensor cores; output in x's dtype."""
    k = x.shape[-1]
    xq, sx = act_quant(x.reshape(-1, k))
    # scale_a [M, K/128] outer-dim-major; scale_b [K/128, N/128] = the stored [N/128, K/128] transposed
    y = F.scaled_mm(xq, q.t(), sx.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                    s.t(), F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)
    return y.to(x.dtype).view(*x.shape[:-1], q.shape[0])


def fp8_block_linear_reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The same maths in plain fp32: quantise-dequantise the activations by `act_quant`'s rule,
    dequantise the weight blocks, multiply."""
    k = x.shape[-1]
    xq, sx = act_quant(x.reshape(-1, k))
    xd = (xq.float().view(-1, k // BLOCK, BLOCK) * sx[..., None]).view(-1, k)
    y = xd @ weight_dequant(q, s, dtype=torch.float32).t()
    return y.to(x.dtype).view(*x.shape[:-1], q.shape[0])


@functools.cache
def fp8_gemm_supported(device: torch.device) -> bool:
    """Whether `fp8_block_linear` runs on `device` and matches its reference (probed once, logged)."""
    if device.type != "cuda" or not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        return False
    why = ""
    try:
        if torch.cuda.get_device_capability(device) < (9, 0):
            why = "needs compute capability 9.0+"
        else:
            g = torch.Generator(device=device).manual_seed(0)
            q, s = weight_quant(torch.randn(256, 512, device=device, generator=g))
            for m in (1, 3, 64):
                x = torch.randn(m, 512, device=device, generator=g, dtype=torch.bfloat16)
                fast, ref = fp8_block_linear(x, q, s).float(), fp8_block_linear_reference(x.float(), q, s)
                if not torch.allclose(fast, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max())):
                    why = f"its result differs from the reference at {m} rows"
                    break
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    name = torch.cuda.get_device_name(device)
    if why:
        log.warning("fp8: %s cannot run the block-scaled FP8 GEMM (%s); FP8 weights are dequantised per block", name, why)
        return False
    log.info("fp8: %s multiplies FP8 weights with block-scaled FP8 GEMMs (F.scaled_mm)", name)
    return True
