"""One training step and the evaluation sums through the pipeline schedule (pipeline_stage > 1).

The schedule splits the rank's concatenated micro-batches itself; the last stage computes each
micro-batch's loss with `loss` below (main-head token-mean CE + the MTP term), which also records
the parts for the log. Balance losses ride on the activations' backward (`ParallelMoE` under PP) and
are summed over the stages for the log. Evaluation passes each micro-batch through the stages in
order, point to point (every schedule, DualPipeV included).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsv3.model.mla import MLA
from dsv3.parallel.api import DistributedModel
from dsv3.parallel.pp import build_schedule, stage_owners
from dsv3.train.loss import combine, logits_losses, masked_ce


def _stack(batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(tokens, target [b, 2, T] = (labels, loss_mask), stage kwargs) of micro-batches put end to end."""
    tokens = torch.cat([b["tokens"] for b in batches])
    target = torch.stack([torch.cat([b["labels"] for b in batches]), torch.cat([b["loss_mask"] for b in batches]).long()], 1)
    kw = {"tokens": tokens}
    if "position_ids" in batches[0]:
        kw["positions"] = torch.cat([b["position_ids"] for b in batches])
    return tokens, target, kw


class PipelineRunner:
    """This rank's pipeline stages (`dm.parts`) stepped by the configured schedule."""

    def __init__(self, dm: DistributedModel, mtp_loss_factor: float, main_weight: float = 1.0):
        self.dm, self.meshes, self.dims = dm, dm.meshes, dm.dims
        self.mtp_loss_factor, self.main_weight = mtp_loss_factor, main_weight
        self.last = self.meshes.pp_rank == self.dims.last_stage_rank
        self.device = self.meshes.device
        self._train = None
        self._recorded: dict[str, list[torch.Tensor]] = {"lm": [], "mtp": []}

    def loss(self, out, target: torch.Tensor) -> torch.Tensor:
        """Last stage, one micro-batch: out (logits, *mtp_logits), target [b, 2, T] = (labels, loss_mask)."""
        logits, mtp_logits = (out[0], list(out[1:])) if isinstance(out, tuple) else (out, [])
        lm, mtp = logits_losses(logits, mtp_logits, target[:, 0], target[:, 1], self.mtp_loss_factor)
        self._recorded["lm"].append(lm.detach())
        self._recorded["mtp"].append(mtp.detach())
        return combine(lm, mtp, None, None, self.main_weight)  # balance and indexer losses ride on the activations

    def _schedule(self):
        """A new schedule over the stages; its first run is the runtime's shape inference, which the
        stages keep out of the balancing counts."""
        for st in self.dm.parts:
            st.expect_shape_inference()
        return build_schedule(self.dm.parts, self.meshes, self.loss)

    def step(self, batches: list[dict[str, torch.Tensor]], autocast) -> torch.Tensor:
        """Forward + backward of the micro-batches; (lm, mtp, aux) means of this replica on every stage."""
        if self._train is None:
            self._train = self._schedule()
        M = len(batches)
        tokens, target, kw = _stack(batches)
        self._recorded = {"lm": [], "mtp": []}
        moes = [m for p in self.dm.parts for m in p.moe_layers()]
        attns = [m for p in self.dm.parts for m in p.modules() if isinstance(m, MLA) and m.attach_indexer_loss]
        for m in moes:
            m.reset_aux_accum()
        for m in attns:
            m.indexer_accum = 0.0
        with autocast():
            self._train.step(tokens, target=target if self.last else None, **kw)
        # the last M records are this step's micro-batches (the first step also has the shape-inference call)
        rec = [torch.stack(self._recorded[k][-M:]).mean() if self._recorded[k] else torch.zeros((), device=self.device)
               for k in ("lm", "mtp")]
        aux = torch.as_tensor(sum(m.aux_accum for m in moes) / M, dtype=torch.float32, device=self.device)
        idx = torch.as_tensor(sum(m.indexer_accum for m in attns) / M, dtype=torch.float32, device=self.device)
        vec = torch.stack(rec + [aux, idx])
        dist.all_reduce(vec, group=self.meshes.pp_group)  # lm/mtp from the last stage, balance losses from every stage
        return vec

    @torch.no_grad()
    def eval_sums(self, batches: list[dict[str, torch.Tensor]], autocast) -> torch.Tensor:
        """(CE sum, token count) of `batches` through the stages in order, without a schedule (a
        forward-only run of the zero-bubble / DualPipeV schedules has no valid action order): each
        stage's output goes to the next stage's rank point to point, or straight on when this rank
        holds both; the last stage's sums are shared over the pipeline group."""
        stages = {st.stage_index: st for st in self.dm.parts}
        owner = stage_owners(self.dims)
        n = self.dims.n_stages
        sums = torch.zeros(2, device=self.device)
        for b in batches:
            kw = {"tokens": b["tokens"]}
            if "position_ids" in b:
                kw["positions"] = b["position_ids"]
            h = None
            for s in range(n):
                if s not in stages:
                    continue
                if s > 0 and h is None:
                    h = self._recv(owner[s - 1])
                with autocast():
                    out = stages[s](h, **kw)
                if s == n - 1:
                    logits = out[0] if isinstance(out, tuple) else out
                    sums += torch.stack(masked_ce(logits, b["labels"], b["loss_mask"]))
                elif owner[s + 1] != self.meshes.pp_rank:
                    self._send(out, owner[s + 1])
                    h = None
                else:
                    h = out
        dist.all_reduce(sums, group=self.meshes.pp_group)
        return sums

    def _send(self, h: torch.Tensor, pp_rank: int) -> None:
        dst = dist.get_global_rank(self.meshes.pp_group, pp_rank)
        head = torch.tensor([h.ndim, *h.shape, *[1] * (4 - h.ndim), int(h.dtype == torch.bfloat16)], device=h.device)
        dist.send(head, dst)
        dist.send(h.contiguous(), dst)

    def _recv(self, pp_rank: int) -> torch.Tensor:
        src = dist.get_global_rank(self.meshes.pp_group, pp_rank)
        head = torch.empty(6, dtype=torch.long, device=self.device)
        dist.recv(head, src)
        h = torch.empty(head[1:1 + int(head[0])].tolist(), dtype=torch.bfloat16 if head[5] else torch.float32, device=self.device)
        dist.recv(h, src)
        return h
