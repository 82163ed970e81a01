"""FP8 training (DeepSeek-V3 §3.3, emulated): the FP8 linear's three products use e4m3 operands with
1x128 / 128x128 scales, and a short run trains like BF16 within the report's 0.25% loss tolerance."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dsv3.checkpoint.fp8 import FP8_MAX
from dsv3.train.fp8 import Fp8Experts, Fp8Linear, Fp8LinearFn, enable_fp8_training, fp8_swiglu, qdq_blocks, qdq_tiles

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
    assert not any(name.endswith(("lm_head", "eh_proj", "gate")) for name in fp8)
    assert "model.layers.0.self_attn.q_a_proj" in fp8 and "model.layers.1.mlp.shared_experts.down_proj" in fp8
    experts = [name for name, m in model.named_modules() if isinstance(m, Fp8Experts)]
    assert experts and len(experts) == sum(1 for _, m in model.named_modules() if type(m).__name__.endswith("Experts"))
    assert n == len(fp8) + len(experts)


def test_routed_experts_products_use_quantised_operands():
    """fp8_swiglu (every expert's gate / up / down on FP8 operands) equals the per-expert QDQ maths, keeps
    empty experts connected, and the model's loop (`Fp8Experts.expert`) gives the same numbers."""
    torch.manual_seed(0)
    E, D, inter = 3, 192, 96
    gate, up, down = (torch.randn(E, inter, D) / 8, torch.randn(E, inter, D) / 8, torch.randn(E, D, inter) / 8)
    ws = [t.clone().requires_grad_() for t in (gate, up, down)]
    xs = torch.randn(7, D, requires_grad=True)
    counts = [4, 0, 3]
    y = fp8_swiglu(xs, counts, *ws)
    y.sum().backward()
    ref, start = [], 0
    for e, n in enumerate(counts):
        x = qdq_tiles(xs.detach()[start:start + n])
        h = torch.nn.functional.silu(x @ qdq_blocks(gate[e]).t()) * (x @ qdq_blocks(up[e]).t())
        ref.append(qdq_tiles(h) @ qdq_blocks(down[e]).t())
        start += n
    ref = torch.cat(ref)
    assert torch.allclose(y, ref, atol=1e-5)
    exact = torch.cat([torch.nn.functional.silu(xs[a:b] @ gate[e].t()) * (xs[a:b] @ up[e].t()) @ down[e].t()
                       for e, (a, b) in enumerate(((0, 4), (4, 4), (4, 7)))]).detach()
    assert (y - exact).abs().max() > 1e-4  # really not the fp32 product
    assert xs.grad is not None and all(w.grad is not None for w in ws) and ws[0].grad[1].abs().sum() == 0

    from dsv3.model.moe import Experts

    ex = Experts(E, D, inter)
    with torch.no_grad():
        ex.gate_proj.copy_(gate), ex.up_proj.copy_(up), ex.down_proj.copy_(down)
    ex.__class__ = Fp8Experts
    x = xs.detach()
    assert torch.allclose(ex.run_sorted(x, torch.tensor(counts)), ref, atol=1e-5)
    assert torch.allclose(ex.expert(2, x[4:]), ref[4:], atol=1e-5)


@pytest.mark.slow
def test_fp8_layouts_equal_one_process(tmp_path):
    """FP8 training through the distributed builder keeps its FP8 modules: expert parallelism carries
    `Fp8Experts`' product over and the shared experts keep their `Fp8Linear`s (dp2 x ep2 = one process
    accumulating 2 micro-batches: the first steps equal within 1e-6, then within the report's 0.25%)."""
    from dsv3.config.load import dump_yaml
    from dsv3.train.trainer import Trainer
    from parallel_harness import losses, multi_run, run_cfg, write_dataset

    prefix = write_dataset(tmp_path)
    runs = {}
    for name, fp8, parallel in (("ref", True, {"data_parallel": 2, "micro_batch_num": 2}),
                                ("bf", False, {"data_parallel": 2, "micro_batch_num": 2})):
        cfg = run_cfg(prefix, tmp_path / name, parallel, steps=6, batch_size=1, save=False, eval_steps=6)
        cfg.train.fp8 = fp8
        Trainer(cfg, quiet=True).fit()
        runs[name] = losses(tmp_path / name)
    cfg = run_cfg(prefix, tmp_path / "ep", {"data_parallel": 2, "expert_parallel": 2, "micro_batch_num": 2}, steps=6, batch_size=1,
                  save=False, eval_steps=6)
    cfg.train.fp8 = True
    dump_yaml(cfg, tmp_path / "ep.yaml")
    (tmp_path / "held").mkdir()
    multi_run(2, [tmp_path / "ep.yaml"], tmp_path / "held")
    got = losses(tmp_path / "ep")
    assert len(got) == len(runs["ref"]) == 6
    # the first steps are the same FP8 products (a module left out under EP would change step 1); later an
    # fp32 reduction-order difference (ulp) flips FP8 roundings and the runs drift apart within FP8's noise
    assert max(abs(a - b) for a, b in zip(got[:2], runs["ref"][:2])) <= 1e-6, (got, runs["ref"])
    assert max(abs(a - b) / b for a, b in zip(got, runs["ref"])) < 0.0025, (got, runs["ref"])
    assert abs(runs["bf"][0] - runs["ref"][0]) > 1e-5  # FP8 changes the very first loss (2.7e-5 here)


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_core_products_match_the_emulation():
    """On a GPU that runs the block-scaled FP8 GEMM, Fprop and Dgrad come from the tensor cores and
    agree with the CPU emulation (same FP8 values; fp32 vs tensor-core accumulation); Wgrad is the same."""
    from dsv3.quant.fp8_gemm import fp8_gemm_supported
    from dsv3.train.fp8 import tensor_cores

    dev = torch.device("cuda")
    if not fp8_gemm_supported(dev):
        pytest.skip("this GPU does not run the block-scaled FP8 GEMM (see the fp8 log line)")
    torch.manual_seed(0)
    x = torch.randn(64, 512)
    w = torch.randn(256, 512) / 16
    dy = torch.randn(64, 256)
    got, ref = {}, {}
    for d, out in ((dev, got), (torch.device("cpu"), ref)):
        xd, wd = x.to(d).requires_grad_(), w.to(d).requires_grad_()
        y = Fp8LinearFn.apply(xd, wd)
        y.backward(dy.to(d))
        out.update(y=y.detach().cpu(), dx=xd.grad.cpu(), dw=wd.grad.cpu())
    assert tensor_cores(x.to(dev), 256, 512)
    for k in ("y", "dx", "dw"):
        scale = float(ref[k].abs().max())
        assert torch.allclose(got[k], ref[k], atol=2e-2 * scale, rtol=2e-2), k
