"""`optimizer.state_dtype`: float32 keeps torch's fused AdamW untouched; bfloat16 is AdamW with BF16
moments (DeepSeek-V3's choice) that tracks torch AdamW closely, decays only matrices, and resumes
bit-identically from a checkpoint."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from dsv3.config.train import LRScheduleConfig, OptimizerConfig, run_config_from_dict
from dsv3.errors import UserError
from dsv3.train.optim import AdamWBF16State, build_optimizer, param_groups
from dsv3.train.trainer import Trainer

from run_config import small_run, steps_then_resume, train_losses


class Small(nn.Module):
    """Matrices (decayed) and a 1-D gain (not decayed), like the model's Linear / RMSNorm split."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.norm_weight = nn.Parameter(torch.ones(24))
        self.proj = nn.Linear(24, 50, bias=False)

    def forward(self, ids):
        h = self.emb(ids) * self.norm_weight
        return nn.functional.cross_entropy(self.proj(torch.tanh(h)), ids.roll(1))


def _train(model, opt, steps, zero_grad=False):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 50, (64,), generator=g)
        opt.zero_grad(set_to_none=False)
        if zero_grad:
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        else:
            model(ids).backward()
        opt.step()


def _pair(state_dtype):
    torch.manual_seed(0)
    a = Small()
    b = Small()
    b.load_state_dict(a.state_dict())
    cfg, lr = OptimizerConfig(state_dtype=state_dtype), LRScheduleConfig(learning_rate=1e-2)
    ref = torch.optim.AdamW(param_groups(b, cfg.weight_decay), lr=1e-2, betas=cfg.betas, eps=cfg.eps)
    return a, build_optimizer(a, cfg, lr), b, ref


def test_float32_is_torch_fused_adamw_unchanged():
    a, opt, b, _ = _pair("float32")
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"]
    ref = torch.optim.AdamW(param_groups(b, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    _train(a, opt, 4)
    _train(b, ref, 4)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_bf16_state_tracks_torch_adamw():
    a, opt, b, ref = _pair("bfloat16")
    assert isinstance(opt, AdamWBF16State)
    p0 = {k: v.clone() for k, v in a.state_dict().items()}
    _train(a, opt, 6)
    _train(b, ref, 6)
    assert all(s[k].dtype == torch.bfloat16 for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    for k, x in a.state_dict().items():
        y = b.state_dict()[k]
        torch.testing.assert_close(x, y, rtol=1e-2, atol=1e-4)
        dx, dy = x - p0[k], y - p0[k]  # the updates themselves, not just the (large) weights
        assert (dx - dy).norm() / dy.norm() < 1e-2, k
    # moments: norm-wise (element-wise, entries where + and - gradients cancel have no relative precision)
    for s_ours, s_ref in zip(opt.state.values(), ref.state.values()):
        for k in ("exp_avg", "exp_avg_sq"):
            assert (s_ours[k].float() - s_ref[k]).norm() / s_ref[k].norm() < 1e-2, k


def test_bf16_state_decay_is_decoupled_and_skips_1d():
    # zero gradients: Adam's step is 0, so only the decay p *= 1 - lr*wd acts, exactly as in torch AdamW
    a, opt, b, ref = _pair("bfloat16")
    _train(a, opt, 3, zero_grad=True)
    _train(b, ref, 3, zero_grad=True)
    for k, x in a.state_dict().items():
        assert torch.equal(x, b.state_dict()[k]), k
    assert torch.equal(a.norm_weight, torch.ones(24))  # 1-D: no decay
    assert not torch.equal(a.proj.weight, Small().proj.weight)


def test_state_dtype_is_checked():
    with pytest.raises(UserError, match="optimizer.state_dtype: 'fp8' is not one of"):
        run_config_from_dict({"optimizer": {"state_dtype": "fp8"}})


def test_bf16_state_resume_is_bit_identical(wiki_prefix, tmp_path):
    """N steps + checkpoint + resume N steps == 2N steps in one run (losses, weights, moments)."""
    def bf16_run(out):
        cfg = small_run(wiki_prefix, out, train={"steps": 4}, checkpoint={"save_steps": 2})
        return dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, state_dtype="bfloat16"))

    ref = Trainer(bf16_run(tmp_path / "ref"), quiet=True)
    ref.fit()
    ref_losses = train_losses(tmp_path / "ref")

    cfg = bf16_run(tmp_path / "run")
    losses, resumed = steps_then_resume(cfg, 2)
    assert resumed.step == 2 and isinstance(resumed.optimizer, AdamWBF16State)
    assert all(s["exp_avg_sq"].dtype == torch.bfloat16 for s in resumed.optimizer.state.values())
    resumed.fit()
    losses.update(train_losses(tmp_path / "run"))
    assert losses == ref_losses and len(losses) == 4  # exact float equality
    state = resumed.model.state_dict()
    for k, v in ref.model.state_dict().items():
        assert torch.equal(state[k], v), k
    ref_opt, opt_state = ref.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in ref_opt:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ref_opt[i][k], opt_state[i][k]), (i, k)
        assert opt_state[i]["exp_avg"].dtype == torch.bfloat16
