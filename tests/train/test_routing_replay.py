"""Routing replay in the trainer (`dsv3.train.replay`): a micro-batch carrying `routed_experts` [B,T,L,K]
routes its forward and backward through those ids (the real `Trainer` and its strategy's
forward/backward), with the per-layer routing agreement in the step's record."""

from __future__ import annotations

import pytest
import torch

from dsv3.errors import UserError
from dsv3.train.replay import main_moe_layers, router_choices as own_routes
from run_config import small_run


@pytest.fixture(scope="module")
def trainer(wiki_prefix, tmp_path_factory):
    from dsv3.train.trainer import Trainer

    cfg = small_run(wiki_prefix, tmp_path_factory.mktemp("replay"), parallel={"micro_batch_num": 1}, train={"steps": 2})
    return Trainer(cfg, quiet=True)


@pytest.fixture(scope="module")
def batch(trainer):
    return trainer._to_device(trainer._next_batch())


def backward_only(trainer, batch) -> dict:
    """The strategy's forward + backward of one micro-batch (no optimizer step): losses, gradients,
    expert counts of every MoE layer and the routing agreement."""
    trainer.optimizer.zero_grad(set_to_none=True)
    for m in trainer.moe_layers:
        m.tokens_per_expert.zero_()
    losses = trainer.strategy.forward_backward([batch], trainer.autocast)
    return {"losses": losses, "agreement": trainer.strategy.routing_agreement,
            "grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None},
            "counts": [m.tokens_per_expert.clone() for m in trainer.moe_layers]}


def test_replaying_the_models_own_routes_changes_nothing(trainer, batch):
    plain = backward_only(trainer, batch)
    routes = own_routes(trainer.model, batch["tokens"])
    routes[:, : routes.shape[1] // 2] = -1  # the first half routes itself (like prompt tokens the server did not report)
    replayed = backward_only(trainer, {**batch, "routed_experts": routes})
    assert plain["agreement"] is None and replayed["agreement"] == [1.0]
    assert replayed["losses"] == plain["losses"]
    assert plain["grads"].keys() == replayed["grads"].keys()
    assert all(torch.equal(plain["grads"][n], replayed["grads"][n]) for n in plain["grads"])
    assert all(torch.equal(a, b) for a, b in zip(plain["counts"], replayed["counts"]))
    gate = main_moe_layers(trainer.model)[0].gate
    assert not gate._forward_pre_hooks and not gate._forward_hooks  # nothing stays on the model after the step


def test_replayed_ids_route_the_forward_and_backward(trainer, batch):
    plain = backward_only(trainer, batch)
    own = own_routes(trainer.model, batch["tokens"])  # [B,T,1,K]
    E = main_moe_layers(trainer.model)[0].gate.n_experts
    # for every token, K experts the router did NOT choose
    taken = torch.zeros(*own.shape[:-1], E, dtype=torch.bool).scatter_(-1, own, True)
    other = (~taken).float().topk(own.shape[-1], dim=-1).indices
    replayed = backward_only(trainer, {**batch, "routed_experts": other})
    assert replayed["agreement"] == [0.0]
    # the main MoE layer's experts ran exactly the replayed (token, expert) pairs
    assert torch.equal(replayed["counts"][0], torch.bincount(other.flatten(), minlength=E).float())
    assert replayed["losses"]["lm"] != plain["losses"]["lm"]
    router = next(n for n in plain["grads"] if n.endswith("mlp.gate.weight") and ".mtp." not in n)
    g = replayed["grads"][router]  # the router learns through the weights recomputed at the replayed ids
    assert g.abs().sum() > 0 and not torch.equal(g, plain["grads"][router])
    rec = trainer.finish_step(replayed["losses"], torch.tensor(1.0))
    assert rec["routing_agreement"] == 0.0 and rec["routing_agreement_layers"] == [0.0]


@pytest.mark.parametrize("change, message", [
    (lambda r: r[..., :1], "expected shape [B, T, MoE layers, experts per token]"),
    (lambda r: r.float(), "expected integer expert ids"),
    (lambda r: r + 8, "expert ids must be in [0, 8)"),
    (lambda r: r[..., :1].expand(r.shape).clone(), "the same expert twice"),
    (lambda r: torch.cat([r[..., :1], -torch.ones_like(r[..., 1:])], -1), "all >= 0 (replayed) or all -1"),
])
def test_bad_routed_experts_is_one_line(trainer, batch, change, message):
    routes = own_routes(trainer.model, batch["tokens"])
    with pytest.raises(UserError) as e:
        backward_only(trainer, {**batch, "routed_experts": change(routes)})
    assert message in str(e.value) and "\n" not in str(e.value)
