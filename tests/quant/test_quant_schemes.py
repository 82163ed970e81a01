"""Every quantised GEMM fast path against its plain reference (dequantise, then matmul), and the
quantisation error of each scheme on random matrices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3.quant.schemes import Int4Weight, int_mm, int_mm_reference, make_scheme, unpack_int4

SHAPES = [(64, 128), (48, 96), (1040, 256)]  # (out, in); 1040 rows > one FP8 chunk, not a multiple of 128


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("method", ["int8", "w8a8", "int4", "fp8"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_fast_path_equals_reference(method, shape, rows):
    scheme = make_scheme(method)
    n, k = shape
    if not scheme.supports(n, k):
        pytest.skip(f"{method} does not take a [{n}, {k}] weight (the layer stays dense)")
    w = torch.randn(n, k) * 0.05
    q, s = scheme.quantize(w)
    x = torch.randn(2, rows, k)
    fast, ref = scheme.linear(x, q, s, k), scheme.linear_reference(x, q, s, k)
    assert fast.shape == (2, rows, n) and fast.dtype == x.dtype
    # int8 (decode rows) and int4 kernels output bf16: agreement to bf16 round-off; the others to fp32's
    tol_ref = 1e-2 if method == "int4" or (method == "int8" and rows * 2 <= 16) else 1e-5
    assert _rel(fast, ref) < tol_ref, (method, _rel(fast, ref))
    # and the quantisation itself is close to the dense product
    tol = {"int8": 0.01, "w8a8": 0.02, "int4": 0.12, "fp8": 0.05}[method]
    assert _rel(ref, F.linear(x, w)) < tol


@pytest.mark.parametrize("method", ["int8", "w8a8", "int4"])
def test_bf16_activations(method):
    scheme = make_scheme(method)
    w = torch.randn(64, 128) * 0.05
    q, s = scheme.quantize(w)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    fast, ref = scheme.linear(x, q, s.to(torch.bfloat16), 128), scheme.linear_reference(x, q, s.to(torch.bfloat16), 128)
    assert fast.dtype == torch.bfloat16 and _rel(fast, ref) < 0.01


def test_int_mm_matches_exact_integer_product():
    a = torch.randint(-127, 128, (5, 72), dtype=torch.int8)
    b = torch.randint(-127, 128, (40, 72), dtype=torch.int8)
    assert torch.equal(int_mm(a, b.t()), int_mm_reference(a, b.t()))
    assert torch.equal(int_mm_reference(a, b.t()), (a.long() @ b.long().t()).int())


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_pack_roundtrip_and_groups(group):
    n, k = 32, 256
    scheme = Int4Weight(group)
    w = torch.randn(n, k)
    q, s = scheme.quantize(w)
    assert q.dtype == torch.uint8 and q.numel() == n * k // 2 and s.shape == (k // group, n, 2)
    vals = unpack_int4(q, n, k)
    assert int(vals.min()) >= 0 and int(vals.max()) <= 15
    # each group spans its full [min, max]: the extremes are exactly representable
    d = scheme.dequantize(q, s, k).view(n, k // group, group)
    g = w.view(n, k // group, group)
    assert torch.allclose(d.amin(-1), g.amin(-1), atol=1e-5) and torch.allclose(d.amax(-1), g.amax(-1), atol=1e-5)


def test_w8a8_is_per_token_dynamic():
    """One large token must not change another token's result (scales are per token)."""
    scheme = make_scheme("w8a8")
    w = torch.randn(32, 64)
    q, s = scheme.quantize(w)
    x = torch.randn(2, 64)
    alone = scheme.linear(x[:1], q, s, 64)
    x[1] *= 1000
    assert torch.equal(scheme.linear(x, q, s, 64)[:1], alone)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["int8", "w8a8", "fp8"])
def test_cuda_fast_path_equals_reference(method):
    scheme = make_scheme(method)
    w = torch.randn(256, 512, device="cuda") * 0.05
    q, s = scheme.quantize(w)
    for rows in (1, 17, 64):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        assert _rel(scheme.linear(x, q, s.to(x.dtype) if method != "fp8" else s, 512),
                    scheme.linear_reference(x, q, s.to(x.dtype) if method != "fp8" else s, 512)) < 0.01
