"""The output head's product for the engine (`dsv3.infer.runner`): x [M, D] @ weight [V, D]ᵀ, the
same as `F.linear` (tests/infer/test_infer_engine.py compares them), on the fastest CPU route for
its shape (figures: docs/performance.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.kernels.onednn import mm_nt, uses_onednn


def head_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, D] @ weight [V, D]ᵀ -> [M, V]. CPU fp32: oneDNN (`mm_nt`). Other CPU dtypes with 2+
    rows: (W @ xᵀ)ᵀ, which MKL runs faster than `F.linear` (that packs the whole head). One row and
    other devices: `F.linear` (a GEMV)."""
    if uses_onednn(x, weight) and x.dim() == 2:
        return mm_nt(x, weight)
    if x.device.type == "cpu" and x.dim() == 2 and x.shape[0] >= 2:
        return (weight @ x.T).T
    return F.linear(x, weight)
