"""MTP loss and the sequence-wise balance loss against hand computations (training.md §b.3, §c)."""

from __future__ import annotations

import math

import pytest

import torch

from dsv3.model import Transformer
from dsv3.model.moe import Gate, sequence_balance_loss
from dsv3.train.loss import compute_loss, mtp_loss


def _hand_ce(logits, target):
    return -torch.log_softmax(logits.double(), -1)[target].item()


def test_mtp_loss_equals_hand_computation():
    B, T, V, D = 2, 7, 11, 2
    labels = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.3).float()
    mask[0, -1] = 1.0
    logits = [torch.randn(B, T, V) for _ in range(D)]
    lam = 0.3
    total, per_depth = mtp_loss(logits, labels, mask, lam)
    expect = []
    for k in range(1, D + 1):
        s = n = 0.0
        for b in range(B):
            for i in range(T - k):  # depth k at position i predicts token i+k+1 = labels[i+k]
                if mask[b, i + k]:
                    s += _hand_ce(logits[k - 1][b, i], labels[b, i + k])
                    n += 1
        expect.append(s / n)  # each depth averaged over its own valid tokens
    for got, want in zip(per_depth, expect):
        assert math.isclose(got.item(), want, rel_tol=1e-5)
    assert math.isclose(total.item(), lam / D * sum(expect), rel_tol=1e-5)


def _hand_seq_aux(s: torch.Tensor, k: int, alpha: float) -> float:
    B, T, E = s.shape
    losses = []
    for b in range(B):
        f = [0.0] * E
        for t in range(T):
            for i in torch.topk(s[b, t], k).indices.tolist():
                f[i] += E / (k * T)
        P = [sum(s[b, t, i].item() / s[b, t].sum().item() for t in range(T)) / T for i in range(E)]
        losses.append(alpha * sum(fi * pi for fi, pi in zip(f, P)))
    return sum(losses) / B


def test_sequence_balance_loss_equals_hand_computation_and_grads_flow_through_p_only():
    B, T, E, K, alpha = 3, 5, 8, 2, 1e-4
    logits = torch.randn(B, T, E, dtype=torch.float64, requires_grad=True)
    s = logits.sigmoid()
    loss = sequence_balance_loss(s, K, alpha)
    assert math.isclose(loss.item(), _hand_seq_aux(s.detach(), K, alpha), rel_tol=1e-6)
    # gradient: f is a constant, P = mean_t s/Σs carries it
    loss.backward()
    with torch.no_grad():
        topk = s.topk(K, -1).indices
        f = torch.zeros(B, E, dtype=s.dtype).scatter_add_(1, topk.flatten(1), torch.ones(B, T * K, dtype=s.dtype)) * E / (K * T)
    ref_logits = logits.detach().clone().requires_grad_(True)
    s2 = ref_logits.sigmoid()
    (alpha * (f * (s2 / s2.sum(-1, keepdim=True)).mean(1)).sum(-1).mean()).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-12)


def test_total_loss_is_main_plus_mtp_plus_every_layers_balance_loss(tiny_config):
    import dataclasses

    cfg = dataclasses.replace(tiny_config, aux_loss_alpha=1e-2, vocab_size=97)
    model = Transformer(cfg)
    model.reset_parameters(std=0.2)
    model.train()
    scores = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: scores.append(out[2])) for m in model.modules() if isinstance(m, Gate)]
    B, T = 2, 9
    tokens = torch.randint(0, 97, (B, T))
    labels = torch.randint(0, 97, (B, T))
    mask = torch.ones(B, T)
    mask[1, :3] = 0
    lam = 0.3
    total, parts = compute_loss(model, {"tokens": tokens, "labels": labels, "loss_mask": mask}, lam)
    for h in hooks:
        h.remove()
    # main CE by hand, MTP by hand from the model's own MTP logits, aux from each gate's scores
    with torch.no_grad():
        logits, mtp_logits = model(tokens, return_mtp=True)
    main = sum(_hand_ce(logits[b, t], labels[b, t]) for b in range(B) for t in range(T) if mask[b, t]) / mask.sum().item()
    mtp = sum(_hand_ce(mtp_logits[0][b, i], labels[b, i + 1]) for b in range(B) for i in range(T - 1) if mask[b, i + 1]) / mask[:, 1:].sum().item()
    n_moe = len(model.moe_layers())
    assert len(scores) == n_moe == 4  # 3 MoE layers of the main model + the MTP block's MoE
    aux = sum(_hand_seq_aux(s.detach().view(B, T, -1), cfg.num_experts_per_tok, cfg.aux_loss_alpha) for s in scores)
    assert math.isclose(parts["lm"].item(), main, rel_tol=1e-4)
    assert math.isclose(parts["mtp"].item(), lam * mtp, rel_tol=1e-4)
    assert math.isclose(parts["aux"].item(), aux, rel_tol=1e-4)
    assert math.isclose(total.item(), main + lam * mtp + aux, rel_tol=1e-4)


def test_bf16_autocast_keeps_the_router_in_fp32(tiny_config):
    import dataclasses

    model = Transformer(dataclasses.replace(tiny_config, vocab_size=1000))
    model.reset_parameters(std=0.2)
    gate = model.moe_layers()[0].gate
    x = torch.randn(16, tiny_config.hidden_size)
    ref = gate.scores(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = gate.scores(x)
        _, parts = compute_loss(model.train(), {"tokens": torch.randint(0, 1000, (1, 8)), "labels": torch.randint(0, 1000, (1, 8)),
                                                "loss_mask": torch.ones(1, 8)}, 0.3)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, ref)
    assert torch.isfinite(parts["lm"]) and parts["lm"].dtype == torch.float32


def test_fused_head_cross_entropy_equals_the_plain_path(tiny_config, monkeypatch):
    import dataclasses

    from dsv3.train import loss as loss_mod

    monkeypatch.setattr(loss_mod, "CE_CHUNK", 5)  # several chunks, the last one partial
    cfg = dataclasses.replace(tiny_config, vocab_size=301, aux_loss_alpha=1e-3)
    model = Transformer(cfg)
    model.reset_parameters(std=0.1)
    model.train()
    batch = {"tokens": torch.randint(0, 301, (2, 9)), "labels": torch.randint(0, 301, (2, 9)), "loss_mask": (torch.rand(2, 9) > 0.2).float()}
    grads = []
    for fused in (False, True):
        model.zero_grad()
        total, parts = compute_loss(model, batch, 0.3, fused_ce=fused)
        total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if not fused:
            ref_total, ref_parts = total.detach(), parts
    torch.testing.assert_close(total.detach(), ref_total)
    for k in ("lm", "mtp", "aux"):
        torch.testing.assert_close(parts[k], ref_parts[k])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_fused_head_cross_entropy_under_bf16_autocast_and_single_backward(monkeypatch):
    """Under autocast the fused head forms its products in bf16 like the plain path; its saved
    gradients are scaled in place, so a second backward through the same graph is refused."""
    from dsv3.train import loss as loss_mod

    monkeypatch.setattr(loss_mod, "CE_CHUNK", 4)  # accumulate over chunks through the autocast branch
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 7, 16, generator=g), torch.randn(50, 16, generator=g) * 0.3
    labels, mask = torch.randint(0, 50, (2, 7), generator=g), (torch.rand(2, 7, generator=g) > 0.2).float()
    grads = []
    for fused in (False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_mod.linear_ce(hh, ww, labels, mask, fused=fused)
        loss.backward(retain_graph=True)
        grads.append((loss.detach(), hh.grad, ww.grad))
        if fused:
            with pytest.raises(RuntimeError, match="backward ran twice"):
                loss.backward()
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)
