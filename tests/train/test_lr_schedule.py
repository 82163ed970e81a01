"""LR schedules: linear warmup from 0, then constant / cosine / warmup-stable-decay."""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.config.train import LRScheduleConfig
from dsv3.train.lr_schedule import build_scheduler, lr_factor


def test_constant_warmup():
    cfg = LRScheduleConfig(type="ConstantWarmUpLR", warmup_steps=4)
    assert [lr_factor(s, cfg, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # warmup_ratio of the seed (0.02) over 100 steps = 2 warmup steps
    assert lr_factor(0, LRScheduleConfig(warmup_ratio=0.02), 100) == 0.5


def test_cosine_ends_at_min_lr():
    cfg = LRScheduleConfig(type="cosine", learning_rate=1.0, min_lr=0.1, warmup_steps=2)
    f = [lr_factor(s, cfg, 12) for s in range(13)]
    assert f[:2] == [0.5, 1.0]
    assert f[2] == 1.0 and math.isclose(f[7], 0.55) and math.isclose(f[12], 0.1)
    assert all(a >= b for a, b in zip(f[1:], f[2:]))


def test_wsd_stable_then_linear_decay():
    cfg = LRScheduleConfig(type="wsd", learning_rate=1.0, min_lr=0.0, warmup_steps=2, decay_ratio=0.4)
    f = [lr_factor(s, cfg, 10) for s in range(10)]
    assert f == pytest.approx([0.5, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0.0])


def test_scheduler_state_round_trips():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    cfg = LRScheduleConfig(type="cosine", learning_rate=1.0, warmup_steps=3)
    s = build_scheduler(opt, cfg, 20)
    for _ in range(5):
        opt.step()
        s.step()
    opt2 = torch.optim.AdamW([p], lr=1.0)
    s2 = build_scheduler(opt2, cfg, 20)
    s2.load_state_dict(s.state_dict())
    assert s2.get_last_lr() == s.get_last_lr()
