"""AdamW with the V3 report's settings and decay only on matrices.

Weight decay goes to every parameter with >= 2 dims (linear weights, embeddings, stacked experts);
1-D parameters (RMSNorm gains; DeepSeek-V3 has no linear biases) get none. The routing bias
`e_score_correction_bias` is a buffer, so the optimizer never sees it at all.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.config.train import LRScheduleConfig, OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (decayed) and 1-D parameters (not decayed); names kept for inspection."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr_cfg: LRScheduleConfig) -> torch.optim.AdamW:
    """torch AdamW over `param_groups` (fused kernels where torch has them for the device)."""
    groups = param_groups(model, cfg.weight_decay)
    device = next(model.parameters()).device
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr_cfg.learning_rate, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
