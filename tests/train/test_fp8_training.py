"""FP8 training (DeepSeek-V3 §3.3, emulated): the FP8 linear's three products use e4m3 operands with
1x128 / 128x128 scales, and a short run trains like BF16 within the report's 0.25% loss tolerance."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dsv3.checkpoint.fp8 import FP8_MAX
from dsv3.train.fp8 import Fp8Linear, Fp8LinearFn, enable_fp8_training, qdq_blocks, qdq_tiles

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))


def _is_e4m3_times_scale(x: torch.Tensor, tile: int) -> bool:
    t = x.reshape(-1, tile)
    s = t.abs().amax(-1, keepdim=True) / FP8_MAX
    return torch.equal((t / s).to(torch.float8_e4m3fn).float() * s, t)


def test_qdq_values_are_fp8_with_tile_scales():
    x = torch.randn(4, 256) * torch.logspace(-3, 3, 256)  # channels of very different sizes
    q = qdq_tiles(x)
    assert _is_e4m3_times_scale(q, 128) and not torch.equal(q, x)
    rel = ((q - x).abs() / x.abs().clamp(min=1e-30)).median()
    assert rel < 0.04  # 3 mantissa bits
    w = torch.randn(256, 384)
    wq = qdq_blocks(w)
    assert not torch.equal(wq, w) and (wq - w).abs().max() <= 0.07 * w.abs().max()


def test_fp8_linear_products_use_quantised_operands():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 192, requires_grad=True)
    w = torch.randn(96, 192, requires_grad=True)
    y = Fp8LinearFn.apply(x, w)
    dy = torch.randn_like(y)
    y.backward(dy)
    xq, wq, dq = qdq_tiles(x.detach()), qdq_blocks(w.detach()), qdq_tiles(dy)
    assert torch.allclose(y, xq @ wq.t(), atol=1e-5)
    assert torch.allclose(x.grad, dq @ wq, atol=1e-5)
    assert torch.allclose(w.grad, dq.reshape(-1, 96).t() @ xq.reshape(-1, 192), atol=1e-4)
    exact = torch.nn.functional.linear(x.detach(), w.detach())
    assert (y - exact).abs().max() > 1e-3  # really not the fp32 product


def test_enable_keeps_head_router_and_eh_proj():
    from dsv3.model.transformer import Transformer
    from parallel_harness import tiny_cfg

    model = Transformer(tiny_cfg())
    params = dict(model.named_parameters())
    n = enable_fp8_training(model)
    assert n > 0 and dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[k] for k, p in model.named_parameters())  # same Parameters: optimizer and checkpoints unchanged
    fp8 = {name for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert len(fp8) == n and not any(name.endswith(("lm_head", "eh_proj", "gate")) for name in fp8)
    assert "model.layers.0.self_attn.q_a_proj" in fp8 and "model.layers.1.mlp.shared_experts.down_proj" in fp8


@pytest.mark.slow
def test_short_run_within_the_reports_tolerance_of_bf16(tmp_path):
    """The report: FP8 training's relative loss error against BF16 stays below 0.25%. Here: 10 steps of
    a small model (hidden 256) on the shipped trainer, per-step losses of the same batches."""
    from dsv3.train.trainer import Trainer
    from parallel_harness import run_cfg, write_dataset

    prefix = write_dataset(tmp_path)
    losses = {}
    for name, fp8, precision in (("bf16", False, "bf16"), ("fp8", True, "bf16")):
        cfg = run_cfg(prefix, tmp_path / name, {"data_parallel": 2, "micro_batch_num": 2}, steps=10, batch_size=1,
                      save=False, eval_steps=10, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                      q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, v_head_dim=32, qk_rope_head_dim=32)
        cfg.train.fp8, cfg.train.precision, cfg.lr_schedule.learning_rate = fp8, precision, 1e-3
        Trainer(cfg, quiet=True).fit()
        recs = [json.loads(s) for s in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in recs if r.get("kind") == "train"]
    rel = [abs(a - b) / a for a, b in zip(losses["bf16"], losses["fp8"])]
    curve = abs(sum(losses["fp8"]) - sum(losses["bf16"])) / sum(losses["bf16"])
    print(f"fp8 vs bf16: curve {curve:.5f}, per step", [round(r, 5) for r in rel])
    # the report compares training curves; a tiny model's steps drift apart (bf16 vs fp32 alone: up to 1.7%)
    assert len(rel) == 10 and curve < 0.0025 and max(rel) < 0.02, (curve, rel)
    assert losses["fp8"] != losses["bf16"]  # FP8 really ran
    assert losses["fp8"][-1] < losses["fp8"][0] - 0.1  # and trains
