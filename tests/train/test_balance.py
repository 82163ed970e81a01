"""Aux-loss-free balancing: the bias update lowers skewed load; the optimizer never touches the bias."""

from __future__ import annotations

import dataclasses

import torch

from dsv3.config.train import LRScheduleConfig, OptimizerConfig
from dsv3.model import Transformer
from dsv3.train.balance import balance_step, load_ratio, take_counts, update_bias
from dsv3.train.optim import build_optimizer


def test_update_rule_is_sign_of_mean_minus_count():
    model = Transformer(dataclasses.replace(_cfg(), vocab_size=1000, num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0))
    model.reset_parameters()
    moe = model.moe_layers()
    counts = torch.tensor([[10.0, 0, 2, 4, 4, 4, 4, 4]])  # mean 4
    update_bias(moe, counts, 0.01)
    expect = torch.tensor([-0.01, 0.01, 0.01, 0, 0, 0, 0, 0])
    torch.testing.assert_close(moe[0].gate.e_score_correction_bias, expect)
    assert moe[0].gate.e_score_correction_bias.dtype == torch.float32


def _cfg():
    from dsv3.config.presets import load_model_config

    return load_model_config("tiny")


def test_bias_update_lowers_max_over_mean_on_skewed_routing(tiny_config):
    cfg = dataclasses.replace(tiny_config, n_group=1, topk_group=1, vocab_size=1000)
    model = Transformer(cfg)
    model.reset_parameters()
    moe = model.moe_layers()[0]
    x = torch.randn(1, 64, cfg.hidden_size)
    with torch.no_grad():  # skew: experts 0 and 1 score high for every token
        moe.gate.weight[:2] += 0.5 * x.mean(dim=(0, 1)) / x.mean(dim=(0, 1)).norm() ** 2
    ratios = []
    for _ in range(60):
        moe(x)  # grad enabled: counts accumulate
        counts = balance_step([moe], rate=0.01)
        ratios.append(load_ratio(counts)[0])
    assert ratios[0] > 2.5, ratios[0]  # heavily skewed to begin with (4.0 = two experts take everything)
    assert max(ratios[-10:]) < 0.6 * ratios[0], ratios
    assert moe.tokens_per_expert.sum() == 0  # taken and zeroed


def test_counts_are_not_taken_without_grad(tiny_config):
    model = Transformer(dataclasses.replace(tiny_config, vocab_size=1000))
    model.reset_parameters()
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 8)))
    assert take_counts(model.moe_layers()).sum() == 0


def test_bias_is_untouched_by_optimizer_and_weight_decay(tiny_config):
    model = Transformer(dataclasses.replace(tiny_config, vocab_size=1000))
    model.reset_parameters()
    for m in model.moe_layers():
        m.gate.e_score_correction_bias.uniform_(-1, 1)
    before = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.5), LRScheduleConfig(learning_rate=0.1))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(m.gate.e_score_correction_bias) not in in_opt for m in model.moe_layers())
    # norms are not decayed, matrices are
    no_decay = next(g for g in opt.param_groups if g["weight_decay"] == 0.0)
    assert all(n.endswith("norm.weight") or "layernorm" in n for n in no_decay["names"])
    assert len(no_decay["names"]) > 0
    for _ in range(3):
        model(torch.randint(0, 1000, (2, 8))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for m, b in zip(model.moe_layers(), before):
        assert torch.equal(m.gate.e_score_correction_bias, b)
        assert m.gate.e_score_correction_bias.grad is None
