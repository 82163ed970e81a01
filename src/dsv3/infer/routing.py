"""Routed-expert capture for `return_routed_experts` (vLLM's name): which experts each MoE layer's
router chose for the tokens a request generates, so a trainer can replay them (`dsv3.train.replay`).

`RouteCapture` puts a forward hook on the router (`Gate`) of every MoE layer of the main model (dense
layers and the MTP block are not captured: the MTP block only drafts, and no logprob depends on
its routing). The hooks keep each layer's top-K ids only during a forward that `recording(True)`
opened (a step where some sequence asked for them); they stay on the device until `take()` stacks
them into one [N, L, K] int16 tensor per forward, read back with the step's sampled tokens.

The ids are global expert ids: under tensor/expert-parallel inference (`dsv3.infer.parallel`) every
rank runs the whole, replicated router on the same (all-reduced) hidden states, so every rank
chooses the same ids; rank 0, which samples, reports them.

Row i of a sequence's `routed_experts` is the routing of the position whose logits sampled generated
token i (the last prompt token for i = 0, generated token i-1 after): [n_generated, L, K], the rows
a trainer needs to recompute the sampled tokens' logprobs. (vLLM's rows are indexed by input
position instead: prompt positions in `prompt_routed_experts`, then generated tokens but the last;
ours are the same decisions shifted by one, every sampled token covered.)

The response grows by L x K ids per generated token, so a request may ask for at most
`MAX_ROUTED_EXPERT_IDS` ids (n x max_tokens x L x K; `LLMEngine(max_routed_expert_ids=...)`); more is
refused with one line. A server request without max_tokens asks for the rest of the context, so
with a long context and a large model it has to give max_tokens.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from dsv3.model.moe import MoE

MAX_ROUTED_EXPERT_IDS = 1 << 22
"""Most expert ids one request may ask for (n x max_tokens x MoE layers x experts per token): 4M ids
(about 12 MB of JSON; 9,000 tokens of DeepSeek-V3's 58 x 8)."""


class RouteCapture:
    """Forward hooks on the main model's routers that record top-K ids while `recording(True)` is open."""

    def __init__(self, model: nn.Module, max_ids: int = MAX_ROUTED_EXPERT_IDS):
        self.max_ids = max_ids
        gates = [layer.mlp.gate for layer in model.model.layers if isinstance(layer.mlp, MoE)]
        self.num_layers = len(gates)
        self.top_k = gates[0].top_k if gates else 0
        self._active = False
        self._ids: list[torch.Tensor] = []
        self._handles = [g.register_forward_hook(self._keep) for g in gates]

    def _keep(self, gate, args, output) -> None:
        if self._active:
            self._ids.append(output[1].to(torch.int16))  # [N,K]; no host sync

    @contextlib.contextmanager
    def recording(self, on: bool) -> Iterator[None]:
        """Record the routers of the forwards run inside (nothing when `on` is False)."""
        self._ids, self._active = [], on
        try:
            yield
        finally:
            self._active = False

    def take(self) -> Optional[torch.Tensor]:
        """The ids recorded by the last `recording(True)` block: [N, L, K] int16 on the host (None if none)."""
        ids, self._ids = self._ids, []
        if not ids:
            return None
        if len(ids) != self.num_layers:
            raise RuntimeError(f"routed-expert capture saw {len(ids)} router calls for {self.num_layers} MoE layers")
        return torch.stack(ids, dim=1).cpu()

    def check(self, tokens: int, what: str) -> None:
        """ValueError (one line, this request only) when the ids of `tokens` generated tokens (`what`
        says how they were counted) exceed the cap."""
        if not self.num_layers:
            raise ValueError("return_routed_experts: this model has no MoE layers")
        total = tokens * self.num_layers * self.top_k
        if total > self.max_ids:
            raise ValueError(f"return_routed_experts: {what} {tokens} x {self.num_layers} MoE layers x {self.top_k} experts "
                             f"per token = {total:,} ids exceeds this server's cap of {self.max_ids:,}; lower max_tokens")


def wanted(seqs) -> bool:
    """Whether any of these sequences asked for its routed experts (the step then records them)."""
    return any(s.routed_experts is not None for s in seqs)


def keep_routes(seqs, ids: Optional[torch.Tensor], rows: list[int]) -> None:
    """Give each sequence that asked for routed experts its row of `ids` [N, L, K] (`rows[j]` for `seqs[j]`)
    as the route of the token it samples next (`Sequence.pending_route`)."""
    if ids is None:
        return
    want = [j for j, s in enumerate(seqs) if s.routed_experts is not None]
    if not want:
        return
    picked = ids[torch.tensor([rows[j] for j in want])].tolist()
    for j, route in zip(want, picked):
        seqs[j].pending_route = route
