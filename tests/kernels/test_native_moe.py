"""The fused MoE (one native call per layer for the routed experts of every token) against the readable
expert loop on dequantised weights (`forward_loop` with `reference = True`), on every ISA path this CPU
can run, for each quantised format, 1..64 tokens, fp32 and bf16 activations; and inside a quantised model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dsv3.kernels import native as nk
from dsv3.model.moe import Experts
from dsv3.quant import QuantConfig, QuantExperts, make_scheme, quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quant"))
from quant_helpers import small_model  # noqa: E402

pytestmark = pytest.mark.skipif(not nk.available(), reason="dsv3 native kernels not built or DSV3_ISA=none")
RUNNABLE = [i for i in nk.ISAS[1:4] if nk.available() and nk.ISAS.index(i) <= nk.ISAS.index(nk.load().detected)]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _experts(method: str, E=6, dim=96, inter=64) -> QuantExperts:
    torch.manual_seed(0)
    ex = Experts(E, dim, inter)
    with torch.no_grad():
        for p in (ex.gate_proj, ex.up_proj, ex.down_proj):
            p.normal_(0, 0.1)
    return QuantExperts.from_experts(make_scheme(method), ex).eval()


# int8 / int4 references round activations (and int4 its scales) to bf16 as torch's kernels did: 1e-2
TOL = {"int8": 1e-2, "int4": 1e-2, "w8a8": 1e-4, "fp8": 1e-5}


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("method", ["int8", "w8a8", "fp8", "int4"])
@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_equals_expert_loop(isa, method, tokens, dtype):
    assert nk.set_isa(isa) == isa
    try:
        qe = _experts(method)
        g = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, 96, generator=g).to(dtype)
        idx = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(tokens)])  # top-3 of 6
        w = torch.rand(tokens, 3, generator=g)
        with torch.no_grad():
            fused = qe.forward_grouped(x, w, idx)
            qe.reference = True
            ref = qe.forward_loop(x, w, idx)
        assert fused.dtype == dtype and fused.shape == x.shape
        assert _rel(fused, ref) < max(TOL[method], 1e-2 if dtype == torch.bfloat16 else 0), (isa, method, _rel(fused, ref))
    finally:
        nk.set_isa(nk.load().isa)


def test_fused_moe_is_one_native_call_per_layer(monkeypatch):
    """A decode-sized forward of a quantised MoE model: each MoE layer's routed experts are one native
    moe call, and no expert runs through the per-expert Python loop."""
    m = small_model()
    quantize_model(m, QuantConfig.preset("int8"))
    calls, loop = [], []
    real = nk.moe
    monkeypatch.setattr(nk, "moe", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    monkeypatch.setattr(QuantExperts, "expert", lambda self, e, x: loop.append(e))
    with torch.no_grad():
        logits = m(torch.randint(0, 512, (2, 3)))
    main_moe = sum(isinstance(x, QuantExperts) for x in m.model.layers.modules())  # MTP's layer does not run here
    assert len(calls) == main_moe > 0 and not loop
    assert torch.isfinite(logits).all()


def test_int4_after_repacking_runs_native_at_prefill_sizes(monkeypatch):
    """int4 weights repacked to dsv3's layout on the first decode call: later prefill-sized calls (more
    rows than MAX_ROWS, more tokens than one fused call takes) run the native GEMV too, never a per-call
    dequantisation of the whole matrix, and equal the reference."""
    from dsv3.quant.native import MAX_MOE_TOKENS, MAX_ROWS

    m = small_model()
    quantize_model(m, QuantConfig.preset("int4"))
    head, experts = m.lm_head, m.model.layers[1].mlp.experts
    t = max(MAX_ROWS, MAX_MOE_TOKENS) + 6
    x = torch.randn(t, experts.dim)
    idx = torch.stack([torch.randperm(experts.n_experts)[:2] for _ in range(t)])
    w = torch.rand(t, 2)
    with torch.no_grad():
        m(torch.randint(0, 512, (1, 2)))  # decode-sized: repacks every int4 module in place
        assert experts.gate_proj.dim() == 4 and head.weight.dim() == 3
        dequant = []
        real = type(head.scheme).dequantize
        monkeypatch.setattr(type(head.scheme), "dequantize", lambda *a: (dequant.append(1), real(*a))[1])
        fast_head, fast_moe = head(x), experts.forward_grouped(x, w, idx)
        assert not dequant
        head.reference = experts.reference = True
        ref_head, ref_moe = head(x), experts.forward_loop(x, w, idx)
    assert _rel(fast_head, ref_head) < 1e-2 and _rel(fast_moe, ref_moe) < 1e-2


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("tokens", [1, 64])
def test_fp32_experts_after_fast_paths_run_one_fused_call(isa, tokens, monkeypatch):
    """A dense fp32 model after `apply_fast_paths` (what the engine runs): a decode batch's routed experts
    are one native f32 MoE call equal to the expert loop; with autograd (training) they are not."""
    from dsv3.kernels import apply_fast_paths

    assert nk.set_isa(isa) == isa
    try:
        ex = Experts(6, 96, 64)
        with torch.no_grad():
            for p in (ex.gate_proj, ex.up_proj, ex.down_proj):
                p.normal_(0, 0.1)
        apply_fast_paths(ex)
        g = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, 96, generator=g)
        idx = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(tokens)])
        w = torch.rand(tokens, 3, generator=g)
        calls = []
        real = nk.moe
        monkeypatch.setattr(nk, "moe", lambda fmt, *a, **k: (calls.append(fmt), real(fmt, *a, **k))[1])
        with torch.no_grad():
            fused, ref = ex.forward_grouped(x, w, idx), ex.forward_loop(x, w, idx)
        assert calls == ["f32"] and _rel(fused, ref) < 1e-5, (isa, _rel(fused, ref))
        ex.forward_grouped(x, w, idx).sum().backward()  # training: the autograd path, not the kernel
        assert calls == ["f32"] and ex.gate_proj.grad is not None
    finally:
        nk.set_isa(nk.load().isa)
