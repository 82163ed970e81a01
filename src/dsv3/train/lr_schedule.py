"""Learning-rate schedules as multipliers of the peak LR, per optimizer step (0-based).

All three warm up linearly from 0: step s < W gets (s+1)/W (torchtitan's form, so the very first
step already moves the weights; MindSpore's ConstantWarmUpLR is the same ramp).
* ConstantWarmUpLR (the seed's): then constant.
* cosine: then 0.5·(1+cos(π·p)) from 1 down to min_lr/lr over the remaining steps (Megatron form).
* wsd (warmup-stable-decay): constant until the last `decay_ratio` of the steps, then linear to min_lr/lr.
"""

from __future__ import annotations

import math

import torch

from dsv3.config.train import LRScheduleConfig


def warmup_steps(cfg: LRScheduleConfig, total: int) -> int:
    """Warmup length: warmup_steps, else round(warmup_ratio x total)."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total))


def lr_factor(step: int, cfg: LRScheduleConfig, total: int) -> float:
    """Multiplier of cfg.learning_rate at 0-based optimizer step `step` of a `total`-step schedule."""
    warm = warmup_steps(cfg, total)
    if step < warm:
        return (step + 1) / warm
    floor = cfg.min_lr / cfg.learning_rate
    if cfg.type == "ConstantWarmUpLR":
        return 1.0
    if cfg.type == "cosine":
        span = max(total - warm, 1)
        p = min((step - warm) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    # wsd
    decay = max(int(round(cfg.decay_ratio * total)), 1)
    start = total - decay
    if step < start:
        return 1.0
    p = min((step - start + 1) / decay, 1.0)
    return 1.0 - (1 - floor) * p


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: LRScheduleConfig, train_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_factor` (its state_dict is the step count, so resume restores it)."""
    total = cfg.total_steps or train_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total))
