"""The native GEMV of every format against its reference (dequantise, then F.linear in fp32), on every ISA
path this CPU can run (lower ISAs forced through `set_isa`), odd shapes, 1..64 rows, fp32 and bf16
activations, through the quantised modules the engine runs (`QuantLinear`, `KernelLinear`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsv3.kernels import native as nk
from dsv3.quant import QuantLinear, make_scheme
from dsv3.quant.native import KernelLinear, tinygemm_to_dsv3
from dsv3.quant.schemes import dsv3_int4_pack, dsv3_int4_unpack, quantize_blocks_int8, unpack_int4

pytestmark = pytest.mark.skipif(not nk.available(), reason="dsv3 native kernels not built or DSV3_ISA=none")


def runnable_isas() -> list[str]:
    best = nk.load().detected
    return [i for i in nk.ISAS[1:4] if nk.ISAS.index(i) <= nk.ISAS.index(best)]


@pytest.fixture(params=runnable_isas())
def isa(request):
    got = nk.set_isa(request.param)
    assert got == request.param
    yield got
    nk.set_isa(nk.load().isa)  # back to the process's choice


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


# (N, K): K off every vector width / FP8 block, N = 1, N off the 4-row tile and the 128-row FP8 block
SHAPES = [(1, 64), (37, 100), (130, 129), (256, 264)]
INT4_SHAPES = [(16, 64), (80, 96), (128, 256)]  # int4 takes N % 16 == 0, K % group == 0


@pytest.mark.parametrize("method", ["int8", "w8a8", "fp8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_native_equals_dequantised_linear(isa, method, rows, dtype):
    torch.manual_seed(rows)
    for n, k in INT4_SHAPES if method == "int4" else SHAPES:
        lin = nn.Linear(k, n, bias=False)
        with torch.no_grad():
            lin.weight.normal_(0, 0.05)
        ql = QuantLinear.from_linear(make_scheme(method), lin)
        x = torch.randn(rows, k).to(dtype)
        w = ql.dequantized_weight()  # before the first call (int4 repacks on it)
        # int4's kernels (torch's and dsv3's) take the (scale, zero) pairs in bf16
        wk = ql.scheme.dequantize(ql.weight, ql.weight_scale_inv.to(torch.bfloat16), k) if method == "int4" else w
        xf = x.float()
        if method == "w8a8":  # the seed's semantics: per-token int8 activations
            s = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
            xf = (xf / s).round().clamp(-127, 127) * s
        if method in ("int8", "int4"):  # the native weight-only kernels' Q8 activations (per 32-value block)
            xf = quantize_blocks_int8(xf)
        with torch.no_grad():
            y = ql(x)
        ref = F.linear(xf, wk)
        assert y.dtype == dtype and y.shape == (rows, n)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert _rel(y, ref) < tol, (isa, method, n, k, rows, _rel(y, ref))
        if method == "int4":  # repacked once to dsv3's layout, which still dequantises to the same matrix
            assert ql.weight.dim() == 3 and torch.equal(ql.dequantized_weight(), w)


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 33, 64])
def test_gemv_rows_1_to_64(isa, rows):
    """The kernel itself takes any row count (the modules send it at most MAX_ROWS)."""
    torch.manual_seed(1)
    q = torch.randint(-127, 128, (75, 161), dtype=torch.int8)
    s = torch.rand(75) / 100
    x = torch.randn(rows, 161)
    y = nk.gemv("int8", x, q, s, None, 75)
    assert _rel(y, F.linear(x, q.float() * s[:, None])) < 1e-5
    wb = torch.randn(75, 161).bfloat16()
    assert _rel(nk.gemv("bf16", x, wb, None, None, 75), F.linear(x, wb.float())) < 1e-5


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_q8_activation_kernels_against_exact_activations(isa, rows):
    """int8 / int4 weights x Q8 activations (int8 per 32-value block, integer dot per block) equal the
    dequantised product on block-quantised activations to float rounding, and stay within the activation
    quantisation's error of the exact-activation kernels (their reference); K off the block (tail in fp32)."""
    torch.manual_seed(rows)
    for n, k in [(75, 161), (37, 20), (130, 1024)]:
        q, s, x = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) / 100, torch.randn(rows, k)
        w = q.float() * s[:, None]
        y, exact = nk.gemv("int8_q8", x, q, s, None, n), nk.gemv("int8", x, q, s, None, n)
        assert _rel(y, F.linear(quantize_blocks_int8(x), w)) < 1e-5 and _rel(exact, F.linear(x, w)) < 1e-5
        assert _rel(y, exact) < 0.02, (isa, n, k, _rel(y, exact))
    for n, k, g in [(16, 64, 32), (80, 96, 32), (64, 512, 128)]:
        vals = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        sz = (torch.rand(n, k // g, 2) / 10).bfloat16()
        w = (vals.float() - 8) * sz[..., 0].float().repeat_interleave(g, 1) + sz[..., 1].float().repeat_interleave(g, 1)
        x = torch.randn(rows, k)
        y, exact = (nk.gemv(f, x, dsv3_int4_pack(vals), sz, None, n, g) for f in ("int4_q8", "int4"))
        assert _rel(y, F.linear(quantize_blocks_int8(x), w)) < 1e-5 and _rel(exact, F.linear(x, w)) < 1e-5
        assert _rel(y, exact) < 0.02, (isa, n, k, _rel(y, exact))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_linear_bf16_weights(isa, dtype):
    """A dense linear kept dense (W8A8's lm_head): bf16 weights through the native bf16 GEMV."""
    lin = nn.Linear(200, 97, bias=False).to(torch.bfloat16)
    lin.__class__ = KernelLinear
    x = torch.randn(1, 4, 200).to(dtype)
    with torch.no_grad():
        y = lin(x)
    assert y.dtype == dtype and _rel(y, F.linear(x.float(), lin.weight.float())) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_int4_repack_keeps_every_value():
    """tinygemm CPU layout -> dsv3's, on the 64-row block formula and on the probing path (N % 64 != 0)."""
    scheme = make_scheme("int4")
    for n, k in [(128, 96), (80, 64)]:
        q, s = scheme.quantize(torch.randn(n, k))
        q2, s2 = tinygemm_to_dsv3(q, s, n, k)
        assert q2.shape == (n, k // 32, 16) and s2.shape == (n, k // 32, 2)
        assert torch.equal(dsv3_int4_unpack(q2).long(), unpack_int4(q, n, k))
        assert torch.equal(scheme.dequantize(q2, s2, k), scheme.dequantize(q, s, k))
    v = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    assert torch.equal(dsv3_int4_unpack(dsv3_int4_pack(v)), v)


def test_sizes_are_checked_before_the_c_code_reads():
    """A stored tensor of the wrong size (hostile or corrupt file) is refused in Python, never read past."""
    lin = nn.Linear(64, 32, bias=False)
    ql = QuantLinear.from_linear(make_scheme("int8"), lin)
    ql.weight_scale_inv = torch.ones(16, 1)  # half the rows' scales
    with pytest.raises(ValueError, match="expected 32"), torch.no_grad():
        ql(torch.randn(1, 64))
    with pytest.raises(ValueError, match="int8 gemv: weight of 1024 bytes for"):
        nk.gemv("int8", torch.randn(1, 64), torch.zeros(16, 64, dtype=torch.int8), torch.ones(32), None, 32)


def test_bad_argument_is_refused():
    q = torch.zeros(16, 20, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="bad argument"):  # int4: K = 40 is not a multiple of the group (32)
        nk.gemv("int4", torch.randn(1, 40), q, torch.zeros(16, 2, 2, dtype=torch.bfloat16), None, 16, 32)


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="needs 2 cores")
def test_torch_set_num_threads_governs_the_kernels():
    q, s, x = torch.ones(64, 64, dtype=torch.int8), torch.ones(64), torch.ones(1, 64)
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = nk.gemv("int8", x, q, s, None, 64)
            assert nk.last_team() == n and torch.equal(y, torch.full((1, 64), 64.0))
    finally:
        torch.set_num_threads(before)
