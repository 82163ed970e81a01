"""Routing replay (R3, "rollout routing replay"): route a training forward and backward through the
experts the inference engine chose.

A batch may carry `routed_experts` [B,T,L,K] (int): for token t of row b, the K expert ids MoE layer l
(the l-th MoE layer of the main model; dense layers and MTP blocks are not counted) routed it to at
inference, in the router's order; a token whose ids are all -1 routes itself (e.g. prompt tokens the
server did not report, or padding). `RoutingReplay` hands each layer's ids to its `Gate` through a
forward pre-hook for as long as the `with` block runs (the forward and the backward, so activation
recompute replays too) and removes the hooks on exit: nothing stays on the model between steps.

The weights of the replayed experts are recomputed from this forward's affinities at those ids (R3:
the inference routing mask, the training router's scores), so the router keeps its gradient.

The routing agreement of a layer is the fraction of replayed tokens whose router's own top-K (as a
set) equals the replayed ids: 1.0 when the trainer would have routed exactly as the server did.

The engine's `return_routed_experts` gives, per generated token i, the routing of the position whose
logits sampled it (prompt length P: position P-1+i of prompt + output); `replay_rows` places those
rows into the [T,L,K] tensor of a training sequence.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dsv3.errors import UserError
from dsv3.model.moe import MoE


def main_moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE modules of the main decoder layers, in layer order (the L axis of `routed_experts`)."""
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]


@torch.no_grad()
def router_choices(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The main MoE layers' own routing of `tokens` [B,T] in one plain forward: [B,T,L,K] int64."""
    seen: list[torch.Tensor] = []
    hooks = [m.gate.register_forward_hook(lambda g, a, out: seen.append(out[1])) for m in main_moe_layers(model)]
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(seen, dim=1).view(*tokens.shape, len(seen), -1)


def replay_rows(routed: Sequence, prompt_len: int, seq_len: int, num_layers: int, top_k: int) -> torch.Tensor:
    """One training sequence's [seq_len, L, K] replay tensor (int64, -1 where nothing is replayed) from the
    engine's per-generated-token rows `routed` [n, L, K]: row i goes to position prompt_len - 1 + i."""
    out = torch.full((seq_len, num_layers, top_k), -1, dtype=torch.int64)
    rows = torch.as_tensor(routed, dtype=torch.int64).reshape(-1, num_layers, top_k)
    end = min(prompt_len - 1 + rows.shape[0], seq_len)
    if prompt_len < 1 or end <= prompt_len - 1:
        return out
    out[prompt_len - 1 : end] = rows[: end - prompt_len + 1]
    return out


def check_routed(routed: torch.Tensor, tokens: torch.Tensor, num_layers: int, top_k: int, n_experts: int) -> None:
    """One UserError line for a `routed_experts` tensor that does not fit the batch and the model."""
    want = (*tokens.shape, num_layers, top_k)
    if routed.dtype.is_floating_point or routed.dtype == torch.bool:
        raise UserError(f"batch routed_experts: expected integer expert ids, got dtype {routed.dtype}")
    if tuple(routed.shape) != want:
        raise UserError(f"batch routed_experts: expected shape [B, T, MoE layers, experts per token] = {list(want)}, "
                        f"got {list(routed.shape)}")
    given = (routed >= 0).all(-1)  # [B,T,L] rows that are replayed
    if bool(((routed >= 0) != given[..., None]).any()):
        raise UserError("batch routed_experts: a token's ids must be all >= 0 (replayed) or all -1 (routes itself)")
    if bool((routed >= n_experts).any()) or bool((routed < -1).any()):
        raise UserError(f"batch routed_experts: expert ids must be in [0, {n_experts}) (or -1), "
                        f"got {int(routed.min())}..{int(routed.max())}")
    ordered = routed.sort(-1).values
    if bool(((ordered[..., 1:] == ordered[..., :-1]) & given[..., None]).any()):
        raise UserError("batch routed_experts: a token lists the same expert twice in one layer")


class RoutingReplay:
    """`with RoutingReplay(model, routed_experts) as replay:` forward (and backward) route through the
    given ids; `replay.agreement()` -> per-layer routing agreement (None for layers that replayed no token).
    `routed_experts` None: a no-op (the model routes itself, agreement() is None)."""

    def __init__(self, model: nn.Module, routed: torch.Tensor | None, tokens: torch.Tensor | None = None):
        self.layers = main_moe_layers(model)
        self.routed = routed
        self.handles: list = []
        self.stats: list[list[torch.Tensor]] = [[] for _ in self.layers]  # per layer: [matching, replayed] per forward
        if routed is None:
            return
        if not self.layers:
            raise UserError("batch routed_experts: this model has no MoE layers to replay")
        gate = self.layers[0].gate
        if tokens is not None:
            check_routed(routed, tokens, len(self.layers), gate.top_k, gate.n_experts)
        self.rows = routed.shape[0] * routed.shape[1]

    def __enter__(self) -> "RoutingReplay":
        if self.routed is None:
            return self
        ids = self.routed.to(torch.int64)
        for i, moe in enumerate(self.layers):
            layer_ids = ids[:, :, i].reshape(self.rows, -1)
            self.handles.append(moe.gate.register_forward_pre_hook(self._pre_hook(i, layer_ids), with_kwargs=True))
            self.handles.append(moe.gate.register_forward_hook(self._post_hook(i, layer_ids)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pre_hook(self, i: int, layer_ids: torch.Tensor):
        def hook(gate, args, kwargs):
            n = args[0].shape[0]
            if n != self.rows:
                raise UserError(f"routing replay: MoE layer {i} routes {n} tokens but the batch's routed_experts hold "
                                f"{self.rows} (B x T); replay needs every rank's router to see the whole micro-batch "
                                f"(no tensor / sequence parallelism, no pipeline micro-splitting)")
            return args, {**kwargs, "replay": layer_ids.to(args[0].device)}
        return hook

    def _post_hook(self, i: int, layer_ids: torch.Tensor):
        def hook(gate, args, output):
            with torch.no_grad():
                _, used, s = output
                replayed = (layer_ids.to(used.device) >= 0).all(-1)
                own = gate.select(s.detach()).sort(-1).values
                same = (own == used.sort(-1).values).all(-1) & replayed
                self.stats[i].append(torch.stack([same.sum(), replayed.sum()]))  # stays on the device
        return hook

    def agreement(self) -> list[float | None] | None:
        """Per main MoE layer: fraction of replayed tokens whose own top-K equals the replayed ids."""
        return merge_agreement([self])


def merge_agreement(parts: list[RoutingReplay]) -> list[float | None] | None:
    """Per-layer agreement over several micro-batches' replays (token-weighted, one device read);
    None when none of them replayed."""
    used = [p for p in parts if p.routed is not None]
    if not used:
        return None
    per_layer = []
    for i in range(len(used[0].layers)):
        rows = [t for p in used for t in p.stats[i]]
        per_layer.append(torch.stack(rows).sum(0).double() if rows else torch.zeros(2, dtype=torch.float64))
    totals = torch.stack([t.cpu() for t in per_layer]).tolist()
    return [m / c if c > 0 else None for m, c in totals]
