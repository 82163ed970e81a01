"""One training step and the evaluation sums through the pipeline schedule (pipeline_stage > 1).

The schedule splits the rank's concatenated micro-batches itself; the last stage computes each
micro-batch's loss with `loss` below (main-head token-mean CE + the MTP term), which also records
the parts for the log. Balance losses ride on the activations' backward (`ParallelMoE` under PP) and
are summed over the stages for the log. Evaluation runs the schedule's forward-only pass on its own
schedule (a forward-only run leaves state in the stages it runs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsv3.parallel.api import DistributedModel
from dsv3.parallel.pp import build_schedule
from dsv3.train.loss import mean_ce, mtp_loss


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

    def __init__(self, dm: DistributedModel, mtp_loss_factor: float):
        self.dm, self.meshes, self.dims = dm, dm.meshes, dm.dims
        self.mtp_loss_factor = mtp_loss_factor
        self.last = self.meshes.pp_rank == self.dims.last_stage_rank
        self.device = self.meshes.device
        self._train = self._eval = None
        self._recorded: dict[str, list[torch.Tensor]] = {"lm": [], "mtp": []}

    def loss(self, out, target: torch.Tensor) -> torch.Tensor:
        """Last stage, one micro-batch: out (logits, *mtp_logits), target [b, 2, T] = (labels, loss_mask)."""
        logits, mtp_logits = (out[0], list(out[1:])) if isinstance(out, tuple) else (out, [])
        labels, mask = target[:, 0], target[:, 1]
        lm = mean_ce(logits, labels, mask)
        mtp = mtp_loss(mtp_logits, labels, mask, self.mtp_loss_factor)[0] if mtp_logits else torch.zeros((), device=lm.device)
        self._recorded["lm"].append(lm.detach())
        self._recorded["mtp"].append(mtp.detach())
        return lm + mtp

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
        for m in moes:
            m.reset_aux_accum()
        with autocast():
            self._train.step(tokens, target=target if self.last else None, **kw)
        # the last M records are this step's micro-batches (the first step also has the shape-inference call)
        rec = [torch.stack(self._recorded[k][-M:]).mean() if self._recorded[k] else torch.zeros((), device=self.device)
               for k in ("lm", "mtp")]
        aux = torch.as_tensor(sum(m.aux_accum for m in moes) / M, dtype=torch.float32, device=self.device)
        vec = torch.stack(rec + [aux])
        dist.all_reduce(vec, group=self.meshes.pp_group)  # lm/mtp from the last stage, balance losses from every stage
        return vec

    def eval_sums(self, batches: list[dict[str, torch.Tensor]], autocast) -> torch.Tensor:
        """(CE sum, token count) of `batches` in groups of micro_batch_num (the shape the schedule was
        built for; a short last group is padded with masked-out copies), from the last stage."""
        if self._eval is None:
            self._eval = self._schedule()
        M = self.dims.micro_batch_num
        sums = torch.zeros(2, device=self.device)
        for g in range(0, len(batches), M):
            group = batches[g:g + M]
            group = group + [{**group[0], "loss_mask": torch.zeros_like(group[0]["loss_mask"])}] * (M - len(group))
            tokens, target, kw = _stack(group)
            self._recorded = {"lm": [], "mtp": []}
            with autocast():
                self._eval.eval(tokens, target=target if self.last else None, **kw)
            if self.last:  # one token-mean CE per micro-batch, in order: back to sums
                counts = torch.stack([m.sum() for m in target[:, 1].tensor_split(M)]).to(self.device, torch.float32)
                sums += torch.stack([(torch.stack(self._recorded["lm"][-M:]) * counts).sum(), counts.sum()])
        dist.all_reduce(sums, group=self.meshes.pp_group)
        return sums
