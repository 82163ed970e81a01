"""`mm_nt(x, w) = x @ wᵀ` for the hand-written training kernels (fused head + cross-entropy, grouped experts).

Fast path: on CPU in fp32, oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, the op torch's
inductor uses for CPU linears). It reads a transposed view as `w` without copying, but copies a
transposed `x` first, so weight gradients (gᵀ h) stay on `torch.mm`.
torch's own fp32 `mm` calls MKL, which on AMD CPUs takes its generic code path: on the 2-core AMD EPYC
(AVX-512) development VM, per-core throughput measured 67 vs 101 GFLOP/s (CPU time, loaded machine)
for the head's [256, 2048] x [2048, V] product. Reference path: `torch.mm` (`reference=True`, and
everywhere else: CUDA, other dtypes, under autocast, torch builds without oneDNN). The two agree to
fp32 rounding (tests/model/test_model_paths.py).
"""

from __future__ import annotations

import functools

import torch


def mm_nt(x: torch.Tensor, w: torch.Tensor, reference: bool = False) -> torch.Tensor:
    """x [M, K] @ w [N, K]ᵀ -> [M, N]; w may be a transposed view (x @ W == mm_nt(x, W.t()))."""
    if (not reference and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and onednn_matmul_supported()):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return x @ w.t()


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
