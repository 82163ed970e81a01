"""Global-norm clipping folded into the optimizer step (`dsv3.train.optim.step_with_clip`): the fused
AdamW path (clip applied by the kernel's `grad_scale` input) against the reference, torch's
`clip_grad_norm_` followed by a plain step, on the same model, gradients and state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dsv3.config.train import LRScheduleConfig, OptimizerConfig
from dsv3.train.optim import build_optimizer, clip_coefficient, step_with_clip


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 16, bias=False), nn.LayerNorm(16), nn.Linear(16, 40, bias=False))


def _grads(model: nn.Module, step: int, scale: float) -> None:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 40, (32,), generator=g)
    loss = nn.functional.cross_entropy(model(ids), ids.roll(1)) * scale
    loss.backward()


@pytest.mark.parametrize("scale", [100.0, 0.01], ids=["clipped", "below_max_norm"])
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_step_with_clip_matches_clip_grad_norm_then_step(scale, state_dtype):
    ref, fast = _model(), _model()
    fast.load_state_dict(copy.deepcopy(ref.state_dict()))
    cfg = OptimizerConfig(state_dtype=state_dtype)
    o_ref, o_fast = build_optimizer(ref, cfg, LRScheduleConfig()), build_optimizer(fast, cfg, LRScheduleConfig())
    assert o_fast.defaults.get("fused", False) == (state_dtype == "float32")  # both paths are exercised
    coefs = []
    for step in range(4):
        _grads(ref, step, scale)
        _grads(fast, step, scale)
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        o_ref.step()
        norm = torch.nn.utils.get_total_norm([p.grad for p in fast.parameters()])
        torch.testing.assert_close(norm, norm_ref)
        coefs.append(clip_coefficient(norm, 1.0))
        step_with_clip(o_fast, coefs[-1])
        for a, b in zip(ref.parameters(), fast.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-9)  # left clipped, as clip_grad_norm_ leaves them
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        o_ref.zero_grad(set_to_none=True)
        o_fast.zero_grad(set_to_none=True)
    assert (min(coefs) < 1.0) == (scale > 1)
    assert not hasattr(o_fast, "grad_scale")


def test_clip_coefficient_is_torch_rule():
    assert clip_coefficient(torch.tensor(4.0), 1.0) == pytest.approx(1.0 / (4.0 + 1e-6))
    assert clip_coefficient(torch.tensor(0.5), 1.0) == 1.0
