"""DeepSeekMoE routing rules (inference.md §c, training.md §b), each checked on its own."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv3.model.moe import Gate, MoE, sequence_balance_loss


def _gate(tiny_config, **kw):
    cfg = dataclasses.replace(tiny_config, **{"hidden_size": 16, "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
                                              "num_experts_per_tok": 4, **kw})
    g = Gate(cfg)
    torch.nn.init.normal_(g.weight, 0, 0.5)
    return g


def reference_route(s, bias, n_group, topk_group, top_k, norm, scale, mask_value=float("-inf")):
    """DeepSeek's official noaux_tc routing, token by token, in plain Python loops."""
    N, E = s.shape
    weights, ids = [], []
    for t in range(N):
        c = s[t] + bias
        per = E // n_group
        gscore = [sorted(c[g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(n_group)]
        keep = sorted(range(n_group), key=lambda g: -sum(gscore[g]))[:topk_group]
        cm = torch.tensor([c[e].item() if e // per in keep else mask_value for e in range(E)])
        idx = sorted(range(E), key=lambda e: -cm[e].item())[:top_k]
        w = s[t, idx]
        if norm:
            w = w / w.sum()
        weights.append(w * scale)
        ids.append(sorted(idx))
    return torch.stack(weights), ids


@pytest.mark.parametrize("norm", [True, False])
def test_gate_matches_reference(tiny_config, norm):
    g = _gate(tiny_config, norm_topk_prob=norm)
    g.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(40, 16)
    w, idx, s = g(x)
    ref_w, ref_idx = reference_route(s, g.e_score_correction_bias, 4, 2, 4, norm, g.route_scale)
    for t in range(len(x)):  # same experts, and each expert gets the same weight
        ours = dict(zip(idx[t].tolist(), w[t].tolist()))
        assert sorted(ours) == ref_idx[t]
        for e in ref_idx[t]:
            expect = s[t, e] * g.route_scale / (s[t, ref_idx[t]].sum() if norm else 1.0)
            assert abs(ours[e] - expect.item()) < 1e-6
    assert torch.allclose(w.sum(-1), ref_w.sum(-1), atol=1e-5)
    assert s.dtype == torch.float32 and w.dtype == torch.float32


def test_dropped_groups_are_masked_with_minus_inf(tiny_config):
    """All biased scores negative: 0.0-masking would pick experts of dropped groups; -inf must not."""
    g = _gate(tiny_config)
    g.e_score_correction_bias.fill_(-2.0)
    g.e_score_correction_bias[::2] -= 0.5  # make group choice non-trivial
    x = torch.randn(64, 16)
    w, idx, s = g(x)
    c = s + g.e_score_correction_bias
    gscore = c.view(64, 4, 2).topk(2, -1).values.sum(-1)
    kept = gscore.topk(2, -1).indices
    for t in range(64):
        assert set((idx[t] // 2).tolist()) <= set(kept[t].tolist())
    # the old 0.0 rule really differs here, so this test would catch it
    _, zero_ids = reference_route(s, g.e_score_correction_bias, 4, 2, 4, True, 2.5, mask_value=0.0)
    assert any(set(z) != set(i) for z, i in zip(zero_ids, idx.tolist()))


def test_bias_chooses_but_does_not_weight(tiny_config):
    """Weights come from the un-biased sigmoid (vllm#12002): a huge bias on expert 7 selects it, with weight s_7."""
    g = _gate(tiny_config, norm_topk_prob=False, n_group=1, topk_group=1)
    g.e_score_correction_bias[7] = 10.0
    x = torch.randn(10, 16)
    w, idx, s = g(x)
    assert (idx == 7).any(-1).all()
    pos = (idx == 7).float().argmax(-1)
    assert torch.allclose(w.gather(1, pos[:, None]).squeeze(1), 2.5 * s[:, 7])


def test_top1_is_renormalised_like_deepseek(tiny_config):
    g = _gate(tiny_config, num_experts_per_tok=1, n_group=1, topk_group=1)
    w, _, _ = g(torch.randn(5, 16))
    assert torch.allclose(w, torch.full_like(w, 2.5))


def test_bias_stays_fp32_under_dtype_casts(tiny_config):
    moe = MoE(dataclasses.replace(tiny_config, hidden_size=16))
    moe.to(torch.bfloat16)
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.gate.weight.dtype == torch.bfloat16
    y = moe(torch.randn(2, 3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_token_counts_and_balance_loss(tiny_config):
    moe = MoE(dataclasses.replace(tiny_config, hidden_size=16, aux_loss_alpha=1e-4))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    moe.train()
    moe(torch.randn(2, 5, 16))
    assert moe.tokens_per_expert.sum().item() == 2 * 5 * moe.top_k
    assert moe.aux_loss is not None and moe.aux_loss.requires_grad
    # perfectly uniform affinities give f_i = 1 for a balanced top-K and loss = alpha * sum_i f_i / E
    E, K, T = 8, 2, 8
    s = torch.full((1, T, E), 0.5)
    loss = sequence_balance_loss(s, K, 1.0)
    f_sum = E / (K * T) * T * K  # every token counts K experts
    assert torch.isclose(loss, torch.tensor(f_sum / E))


def test_model_cast_keeps_router_bias_fp32_and_exact(tiny_config):
    """model.to(bfloat16) must not round the routing bias (it only picks experts, in fp32)."""
    import torch

    from dsv3.model import Transformer

    model = Transformer(tiny_config)
    model.reset_parameters()
    gate = model.moe_layers()[0].gate
    bias = torch.randn_like(gate.e_score_correction_bias) * 1e-3 + 1.0 / 3.0  # not representable in bf16
    gate.e_score_correction_bias.copy_(bias)
    model.to(torch.bfloat16)
    assert gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, bias)
    assert model.lm_head.weight.dtype == torch.bfloat16
