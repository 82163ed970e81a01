"""oneDNN's fp32 matmul for the CPU: `mm_nt(x, w) = x @ wᵀ` for the hand-written training kernels
(fused head + cross-entropy, grouped experts), and `OneDNNLinear`, the `nn.Linear` whose matmuls
(forward, input and weight gradients) go through it, swapped in for the model's plain `nn.Linear`s by
`dsv3.kernels.apply_fast_paths`.

Fast path: on CPU in fp32, oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, the op torch's
inductor uses for CPU linears). It reads a transposed view as `w` without copying and copies a
transposed `x` first; even with that copy it beats MKL on weight gradients (gᵀ h: `mm_tn_into`).
torch's own fp32 `mm` calls MKL, which on AMD CPUs takes its generic code path (figures:
docs/performance.md). Reference path: `torch.mm` (`reference=True`, and everywhere else: CUDA,
other dtypes, under autocast, torch builds without oneDNN). The two agree to fp32 rounding
(tests/model/test_model_paths.py).
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def mm_nt(x: torch.Tensor, w: torch.Tensor, reference: bool = False) -> torch.Tensor:
    """x [M, K] @ w [N, K]ᵀ -> [M, N]; w may be a transposed view (x @ W == mm_nt(x, W.t()))."""
    if not reference and uses_onednn(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return x @ w.t()


def uses_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `mm_nt(x, w)` takes the oneDNN path: CPU, both fp32, no autocast, a build that has it."""
    return (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and onednn_matmul_supported())


def mm_tn_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out = aᵀ b for a [n, N], b [n, K] (a weight gradient: output gradients times inputs).
    oneDNN product then one copy into `out` where `mm_nt` uses oneDNN (faster than MKL's in-place
    GEMM even with the copy), `torch.mm(out=)` elsewhere."""
    if uses_onednn(a, b):
        return out.copy_(mm_nt(a.t(), b.t()))
    return torch.mm(a.t(), b, out=out)


@functools.cache
def onednn_matmul_supported() -> bool:
    """Whether this torch build has oneDNN's fp32 linear op (probed once with a tiny exact product)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.ones(2, 3), torch.full((4, 3), 2.0)
        return bool((torch.ops.mkldnn._linear_pointwise(x, w.t().contiguous().t(), None, "none", [], "") == 6).all())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def linear_nt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w [N, K]ᵀ -> [..., N] through `mm_nt` (leading dimensions flattened into rows)."""
    return mm_nt(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])


class LinearNT(torch.autograd.Function):
    """y = x Wᵀ with all three matmuls on `mm_nt`: dx = dy W, dW = dyᵀ x (torch's linear backward
    would run both on `torch.mm`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return linear_nt(x, w)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        d2 = dy.reshape(-1, dy.shape[-1])
        dx = mm_nt(d2, w.t()).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = mm_nt(d2.t(), x.reshape(-1, x.shape[-1]).t()) if ctx.needs_input_grad[1] else None
        return dx, dw


class OneDNNLinear(nn.Linear):
    """`nn.Linear` (same parameters, names and checkpoints; tensor parallelism and quantisation replace
    or redistribute it like any `nn.Linear`) whose product runs on `mm_nt`'s oneDNN path when that path
    applies: a plain fp32 CPU weight (not a DTensor shard), no bias, no autocast. Everywhere else, and
    with `reference = True`, it is `nn.Linear.forward` (`F.linear`), which tests compare it with."""

    reference = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.reference or self.bias is not None or type(w) not in (nn.Parameter, torch.Tensor) or not uses_onednn(x, w):
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return LinearNT.apply(x, w)
        return linear_nt(x, w)
