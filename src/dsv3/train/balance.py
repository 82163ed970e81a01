"""Aux-loss-free load balancing (`training.md` §b.2): one bias update per optimizer step.

Every MoE layer accumulates `tokens_per_expert` [E] in each forward run with grad enabled, so after
all micro-batches of a step it holds that step's (token, expert) assignment counts. Then, per layer,

    b_i += γ · sign(mean_j c_j − c_i)

(overloaded experts become less attractive, underloaded ones more). `step_counts` is the single
place counts are gathered: a data-parallel run passes `reduce=` an all-reduce over every rank that saw
different tokens, so all ranks apply the same update to identical biases.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from dsv3.model.moe import MoE


def take_counts(moe_layers: list[MoE]) -> torch.Tensor:
    """Stack the layers' accumulated counts [L,E] (fp32) and zero the accumulators."""
    counts = torch.stack([m.tokens_per_expert.detach().clone() for m in moe_layers])
    for m in moe_layers:
        m.tokens_per_expert.zero_()
    return counts


@torch.no_grad()
def update_bias(moe_layers: list[MoE], counts: torch.Tensor, rate: float) -> None:
    """b += rate · sign(mean − count) per layer; counts [L,E]."""
    delta = rate * torch.sign(counts.mean(dim=1, keepdim=True) - counts)  # [L,E]
    for m, d in zip(moe_layers, delta):
        bias = m.gate.e_score_correction_bias
        if bias is not None:
            bias += d.to(bias.device, bias.dtype)


def balance_step(moe_layers: list[MoE], rate: float, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Take this step's counts (all micro-batches), reduce them across ranks, update the biases; returns counts [L,E]."""
    counts = take_counts(moe_layers) if moe_layers else torch.zeros(0, 0)
    if reduce is not None and counts.numel():
        counts = reduce(counts)
    if rate > 0 and counts.numel():
        update_bias(moe_layers, counts, rate)
    return counts


def load_ratio(counts: torch.Tensor) -> list[float]:
    """max/mean expert load per layer (1.0 is perfectly balanced) from counts [L,E]."""
    if counts.numel() == 0:
        return []
    mean = counts.mean(dim=1).clamp(min=1e-9)
    return (counts.max(dim=1).values / mean).tolist()


def layer_labels(parts: list[torch.nn.Module]) -> list[str]:
    """Names of the MoE layers of `parts`, in `moe_layers()` order (module order): "layer N" for
    decoder layer N, "MTP k" for the k-th multi-token-prediction block."""
    out = []
    for part in parts:
        for name, m in part.named_modules():
            if isinstance(m, MoE):
                mtp, layer = re.search(r"(?:^|\.)mtp\.(\d+)\.", name), re.search(r"(?:^|\.)layers\.(\d+)\.", name)
                out.append(f"MTP {mtp.group(1)}" if mtp else f"layer {layer.group(1)}" if layer else name)
    return out
