"""Grouped routed experts: the fast paths of `Experts.run_sorted` (the model's per-expert loop over
slices sorted by expert), swapped in by `dsv3.kernels.apply_fast_paths`.

* On CUDA (bf16) each projection is one `torch._grouped_mm` over all experts, with no host sync.
* On CPU at decode sizes (fp32 weights, no autograd, at most `MAX_MOE_TOKENS` tokens) one fused call
  of the native kernels (`dsv3.kernels.native.moe`, format f32) runs every token's routed experts.
* Elsewhere `GroupedSwiGLU` loops over the slices with `mm_nt` (oneDNN on CPU fp32) and a
  hand-written backward that writes each expert's weight gradient into its row of the stacked
  gradients; on CPU it beat torch's own CPU grouped kernel (docs/performance.md), and a host sync
  costs nothing there.

Reference: `Experts.forward_loop` / `Experts.run_sorted`; tests/model/test_model_paths.py compares
outputs and gradients (with and without `_grouped_mm`, under bf16 autocast, with idle experts).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dsv3.kernels import native as nk
from dsv3.kernels.onednn import mm_nt, mm_tn_into
from dsv3.model.moe import Experts


MAX_MOE_TOKENS = 64
"""Most tokens a fused native MoE call takes (decode batches), as `dsv3.quant.native.MAX_MOE_TOKENS`."""


class GroupedExperts(Experts):
    """`Experts` (same parameters and names) whose sorted slices run in one grouped call per
    projection (`torch._grouped_mm` where it runs) or through `grouped_swiglu`; decode batches on CPU
    in one fused native call."""

    def forward_grouped(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ws = (self.gate_proj, self.up_proj, self.down_proj)
        if (x.device.type == "cpu" and x.shape[0] <= MAX_MOE_TOKENS and nk.available()
                and all(t.dtype == torch.float32 and t.is_contiguous() for t in ws)
                and not (torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in ws)))):
            return nk.moe("f32", x, idx, w, [t.detach() for t in ws], [None] * 3, [None] * 3, self.gate_proj.shape[1]).to(x.dtype)
        return super().forward_grouped(x, w, idx)

    def run_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [M,D] sorted by expert, counts [E] -> [M,D] (`Experts.run_sorted`)."""
        # _grouped_mm is not autocast-aware and needs one dtype: under autocast, use the sliced loop
        if (xs.device.type in GROUPED_MM_DEVICES and xs.dtype == self.gate_proj.dtype
                and not torch.is_autocast_enabled(xs.device.type) and grouped_mm_supported(xs.device, xs.dtype)):
            offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's slice
            gate = torch._grouped_mm(xs, self.gate_proj.transpose(1, 2), offs=offs)  # [M, I]
            up = torch._grouped_mm(xs, self.up_proj.transpose(1, 2), offs=offs)
            return torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offs)  # [M, D]
        return grouped_swiglu(xs, counts.tolist(), self.gate_proj, self.up_proj, self.down_proj)  # one host sync


def grouped_swiglu(xs: torch.Tensor, counts: list[int], gate_w: torch.Tensor, up_w: torch.Tensor,
                   down_w: torch.Tensor) -> torch.Tensor:
    """SwiGLU of expert e on rows [Σ counts[:e], Σ counts[:e+1]) of xs [M,D] -> [M,D] (`GroupedSwiGLU`).

    Under autocast the matmul operands are cast as `F.linear` would cast them (same maths as the
    per-expert `Experts.expert` loop); the casts stay in the graph, so gradients reach the fp32 weights.
    """
    dev = xs.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        xs, gate_w, up_w, down_w = (t.to(dt) for t in (xs, gate_w, up_w, down_w))
        with torch.autocast(dev, enabled=False):
            return GroupedSwiGLU.apply(xs, gate_w, up_w, down_w, counts)
    return GroupedSwiGLU.apply(xs, gate_w, up_w, down_w, counts)


class GroupedSwiGLU(torch.autograd.Function):
    """Fast path of the per-expert loop `y_e = down_e(silu(gate_e(x_e)) · up_e(x_e))` over sorted slices.

    Same matmuls (`mm_nt`: oneDNN on CPU fp32) and elementwise ops as autograd runs for the loop,
    but the backward writes each expert's weight gradient straight into its row of the stacked
    [E, ...] gradients. Autograd through `W[e]` would instead build a zero-filled full-size gradient
    per expert and projection and add them up (SelectBackward: O(E²) memory traffic, a third of the
    step's time in a profile: docs/performance.md). Saves xs and the pre-activations
    gate/up [M,I]; silu is recomputed in the backward.
    """

    @staticmethod
    def forward(ctx, xs, gate_w, up_w, down_w, counts: list[int]):
        M, I = xs.shape[0], gate_w.shape[1]
        gate, up = xs.new_empty(M, I), xs.new_empty(M, I)
        ys = xs.new_empty(M, down_w.shape[1])
        for e, sl in _slices(counts):
            gate[sl] = mm_nt(xs[sl], gate_w[e])
            up[sl] = mm_nt(xs[sl], up_w[e])
            ys[sl] = mm_nt(F.silu(gate[sl]) * up[sl], down_w[e])
        ctx.save_for_backward(xs, gate_w, up_w, down_w, gate, up)
        ctx.counts = counts
        return ys

    @staticmethod
    def backward(ctx, dy):
        xs, gate_w, up_w, down_w, gate, up = ctx.saved_tensors
        need_x, need_g, need_u, need_d = ctx.needs_input_grad[:4]
        idle = 0 in ctx.counts  # an expert without rows gets a zero gradient
        new = torch.zeros_like if idle else torch.empty_like
        dx = torch.empty_like(xs) if need_x else None
        dg_w, du_w, dd_w = (new(t) if need else None for t, need in ((gate_w, need_g), (up_w, need_u), (down_w, need_d)))
        for e, sl in _slices(ctx.counts):
            g, u, x, d = gate[sl], up[sl], xs[sl], dy[sl]
            sg = F.silu(g)
            if need_d:
                mm_tn_into(dd_w[e], d, sg * u)
            dh = mm_nt(d, down_w[e].t())  # [n, I]
            dg = torch.ops.aten.silu_backward(dh * u, g)
            du = dh * sg
            if need_g:
                mm_tn_into(dg_w[e], dg, x)
            if need_u:
                mm_tn_into(du_w[e], du, x)
            if need_x:
                dx[sl] = mm_nt(dg, gate_w[e].t()).add_(mm_nt(du, up_w[e].t()))
        return dx, dg_w, du_w, dd_w, None


def _slices(counts: list[int]):
    """(expert, row slice) for every expert with rows, slices back to back from row 0."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
            start += n


GROUPED_MM_DEVICES = {"cuda"}
"""Device types on which `GroupedExperts` uses `torch._grouped_mm` (when it runs there)."""


@functools.cache
def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs here (probed once per device/dtype with a tiny call)."""
    if not hasattr(torch, "_grouped_mm") or (device.type == "cuda" and dtype != torch.bfloat16):
        return False
    try:
        a = torch.ones(4, 16, device=device, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device, dtype=dtype)
        out = torch._grouped_mm(a, b.transpose(1, 2), offs=torch.tensor([1, 4], device=device, dtype=torch.int32))
        return bool((out == 16).all())
    except (RuntimeError, NotImplementedError):
        return False


