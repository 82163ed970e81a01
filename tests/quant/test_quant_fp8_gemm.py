"""The CUDA FP8 block GEMM (`dsv3.quant.fp8_gemm`): DeepSeek's activation rule on any device, the
operand and scale layouts `F.scaled_mm` demands (checked by torch's own shape/stride checker on the
meta device, so without a GPU), and on a GPU the fast path against its fp32 reference."""

from __future__ import annotations

import pytest
import torch

from dsv3.checkpoint.fp8 import weight_quant
from dsv3.quant.fp8_gemm import (act_quant, fp8_block_linear, fp8_block_linear_reference, fp8_gemm_supported,
                                 shape_eligible)


def test_act_quant_is_deepseeks_rule():
    """Per token and 128-column block: s = amax / 448, q = x / s in float8_e4m3fn (inference/kernel.py)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 384, generator=g) * torch.logspace(-3, 3, 5)[:, None]
    q, s = act_quant(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 3)
    blocks = x.view(5, 3, 128)
    torch.testing.assert_close(s, blocks.abs().amax(-1) / 448.0)
    assert torch.equal(q.view(5, 3, 128), (blocks / s[..., None]).to(torch.float8_e4m3fn))
    back = q.float().view(5, 3, 128) * s[..., None]
    assert ((back - blocks).abs() <= blocks.abs() * 2**-4 + s[..., None] * 2**-9).all()  # e4m3: 3 mantissa bits


def test_scaled_mm_layouts_pass_torchs_checker_on_meta():
    """The call torch would make on a GPU, checked by torch's meta kernel (shapes and strides of both
    block scales); a wrongly laid out scale is refused there, so the check is live."""
    x = torch.empty(3, 512, device="meta", dtype=torch.bfloat16)
    q = torch.empty(256, 512, device="meta", dtype=torch.float8_e4m3fn)
    y = fp8_block_linear(x, q, torch.empty(2, 4, device="meta"))
    assert y.shape == (3, 256) and y.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="blockwise"):
        fp8_block_linear(x, q, torch.empty(4, 2, device="meta"))  # scales of the transposed weight


def test_eligibility_and_cpu():
    assert shape_eligible(256, 512) and shape_eligible(7168, 2048)
    assert not shape_eligible(576, 7168)  # kv_a_proj: a partial 128-row block -> dequantised path
    assert not shape_eligible(256, 384)  # 3 K-blocks: not the 4-aligned scale layout
    assert not fp8_gemm_supported(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_block_linear_matches_reference_on_cuda():
    dev = torch.device("cuda")
    if not fp8_gemm_supported(dev):
        pytest.skip(f"{torch.cuda.get_device_name(dev)}: no block-scaled FP8 GEMM (see the warning logged)")
    g = torch.Generator(device=dev).manual_seed(0)
    q, s = weight_quant(torch.randn(1024, 2048, device=dev, generator=g) * 0.02)
    for m in (1, 8, 200):
        x = torch.randn(m, 2048, device=dev, generator=g, dtype=torch.bfloat16)
        fast, ref = fp8_block_linear(x, q, s).float(), fp8_block_linear_reference(x.float(), q, s)
        err = (fast - ref).abs().max() / ref.abs().max()
        assert err < 1e-2, (m, float(err))  # bf16 output rounding over an fp32-accumulated product
