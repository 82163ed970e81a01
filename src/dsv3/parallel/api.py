"""What the trainer calls: `parallelize(model, dims, meshes)` -> a `DistributedModel` with
`forward_backward(window)`, `finalize_grads()`, `reduce_expert_counts()` and `parts`.

One training step (what `train_step` does, and what the trainer's loop should do):
    loss = dm.forward_backward(window)       # FSDP / TP / EP collectives, pipeline schedule
    dm.finalize_grads()                      # MoE + DDP all-reduces, tied-embedding sum under PP
    dm.reduce_expert_counts()                # balancing counts summed over every rank with other tokens
    update_expert_bias(dm.parts, gamma)      # identical on every rank
    optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from dsv3.model.moe import MoE
from dsv3.model.transformer import Transformer
from dsv3.parallel.dims import Meshes, ParallelDims
from dsv3.parallel.ep import parallelize_moe
from dsv3.parallel.fsdp import _local, apply_fsdp, sync_grads
from dsv3.parallel.layout import recompute_layer_ids, stage_layers
from dsv3.parallel.pp import build_schedule, build_stages
from dsv3.parallel.recompute import apply_recompute
from dsv3.parallel.tp import apply_tp


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, mtp_logits=(), mtp_lambda: float = 0.3) -> torch.Tensor:
    """Mean next-token CE + (lambda/D) sum_k mean CE of MTP depth k (training.md §c).
    logits [B,T,V]; labels [B,T] (labels[:, i] = token i+1); depth k's logits at i target labels[:, i+k]."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    if mtp_logits:
        D = len(mtp_logits)
        for k, lg in enumerate(mtp_logits, start=1):
            loss = loss + (mtp_lambda / D) * F.cross_entropy(lg[:, :-k].flatten(0, 1).float(), labels[:, k:].flatten())
    return loss


class DistributedModel:
    """The model parts this rank holds (the Transformer, or its pipeline stages) and how to step them."""

    def __init__(self, parts: list[nn.Module], meshes: Meshes, mtp_lambda: float, schedule=None):
        self.parts, self.meshes, self.dims = parts, meshes, meshes.dims
        self.mtp_lambda = mtp_lambda
        self.schedule = schedule
        self._embed_group = None
        self.fsdp = self.dims.dp_shard == "fsdp" and self.dims.dp > 1

    # ---- data
    def local_batch(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global window [B, T+1] -> this replica's (input_ids, labels) [B/dp, T]."""
        B = window.shape[0]
        self.dims.validate(batch_size=B)  # divisible by data_parallel, then by micro_batch_num
        b = B // self.dims.dp
        w = window[self.meshes.dp_rank * b : (self.meshes.dp_rank + 1) * b].to(self.meshes.device)
        return w[:, :-1], w[:, 1:]

    def _loss_fn(self, out, labels):
        if isinstance(out, tuple):
            return lm_loss(out[0], labels, out[1:], self.mtp_lambda)
        return lm_loss(out, labels)

    # ---- step
    def forward_backward(self, window: torch.Tensor) -> float:
        """Forward + backward of one global batch; returns the global mean loss (same on all ranks)."""
        ids, labels = self.local_batch(window)
        if self.dims.pp > 1:
            if self.schedule is None:
                self.schedule = build_schedule(self.parts, self.meshes, self._loss_fn)
            pp_last = self.meshes.pp_rank == self._last_stage_rank()
            losses: list[torch.Tensor] = []
            moes = [m for p in self.parts for m in p.modules() if isinstance(m, MoE)]
            for m in moes:
                m.aux_accum = 0.0
            self.schedule.step(ids, tokens=ids, target=labels if pp_last else None, losses=losses)
            loss = torch.stack(losses).mean().detach() if losses else torch.zeros((), device=ids.device)
            # balance losses of this rank's layers (they reached backward through the activations)
            loss = loss + sum(m.aux_accum for m in moes) / self.dims.micro_batch_num
            dist.all_reduce(loss, group=self.meshes.pp_group)  # only the last stage's rank is non-zero
        else:
            model = self.parts[0]
            M = self.dims.micro_batch_num
            loss = torch.zeros((), device=ids.device)
            for mb_ids, mb_labels in zip(ids.chunk(M), labels.chunk(M)):
                logits, mtp = model(mb_ids, return_mtp=True)
                mb_loss = lm_loss(logits, mb_labels, mtp, self.mtp_lambda) / M
                aux = model.aux_loss() if isinstance(model, Transformer) else None
                if aux is not None:
                    mb_loss = mb_loss + aux / M
                mb_loss.backward()
                loss += mb_loss.detach()
        if self.dims.dp > 1:
            dist.all_reduce(loss, group=self.meshes.dense.get_group("dp"))
            loss /= self.dims.dp
        return loss.item()

    def _last_stage_rank(self) -> int:
        if self.dims.schedule in ("ZBVZeroBubble", "DualPipeV") and self.dims.v == 2:
            return 0
        return self.dims.pp - 1

    def finalize_grads(self) -> None:
        """Gradient all-reduces outside FSDP, and the tied-embedding sum across pipeline stages."""
        sync_grads(self.parts, self.meshes, self.fsdp)
        if self.dims.pp > 1:
            self._tie_embedding_grads()

    def _tie_embedding_grads(self) -> None:
        """Stage 0's embedding and the last stage's copy (used by MTP) get the sum of both gradients."""
        if not self.parts[0].config.num_nextn_predict_layers:
            return
        grads = [_local(p.model.embed_tokens.weight.grad) for p in self.parts
                 if getattr(p.model, "embed_tokens", None) is not None and p.model.embed_tokens.weight.grad is not None]
        total = torch.stack(grads).sum(0) if grads else None
        if self._embed_group is not None:  # the two copies live on different ranks
            dist.all_reduce(total, group=self._embed_group)
        for g in grads:
            g.copy_(total)

    def reduce_expert_counts(self) -> None:
        """Sum every MoE's `tokens_per_expert` over the ranks of this stage that routed other tokens."""
        reduce_expert_counts([m for p in self.parts for m in p.modules() if isinstance(m, MoE)], self.meshes)

    def train(self, mode: bool = True):
        for p in self.parts:
            p.train(mode)
        return self

    def parameters(self):
        seen = set()
        for part in self.parts:
            for p in part.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p


def reduce_expert_counts(moes: list[MoE], meshes: Meshes) -> None:
    """All-reduce the `tokens_per_expert` buffers over the dp x tp ranks of each stage (training.md §b.2)."""
    if not moes or meshes.dims.dp * meshes.dims.tp == 1:
        return
    flat = torch.cat([m.tokens_per_expert for m in moes])
    dist.all_reduce(flat, group=meshes.tokens_group)
    for m, c in zip(moes, flat.split([m.tokens_per_expert.numel() for m in moes])):
        m.tokens_per_expert.copy_(c)


@torch.no_grad()
def update_expert_bias(moes: list[MoE], gamma: float) -> None:
    """b_i += gamma * sign(mean - c_i) per MoE layer from the (reduced) counts, then zero the counts."""
    for m in moes:
        bias = m.gate.e_score_correction_bias
        c = m.tokens_per_expert
        if bias is not None and gamma > 0:
            bias += gamma * torch.sign(c.mean() - c)
        c.zero_()


def _embed_groups(meshes: Meshes, last_rank: int) -> dist.ProcessGroup | None:
    """Groups {stage-0 rank, last-stage rank} with the same (dp, tp) coordinates; this rank's one."""
    dims = meshes.dims
    if last_rank == 0:
        return None
    mine = None
    mesh = meshes.dense.mesh  # [pp, dp, tp]
    for d in range(dims.dp):
        for t in range(dims.tp):
            ranks = sorted({int(mesh[0, d, t]), int(mesh[last_rank, d, t])})
            g = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                mine = g
    return mine


def parallelize(model: Transformer, dims: ParallelDims, meshes: Meshes, mtp_lambda: float = 0.3,
                param_dtype: torch.dtype | None = None, offset: list[int] | None = None, recompute: str = "none",
                recompute_layers: list[int] | None = None) -> DistributedModel:
    """Apply PP (this rank's stages, `offset` per stage), EP, TP(+SP), activation recompute and
    FSDP/DDP to `model`, in that order (torchtitan's). Build `model` on the meta device and
    materialise afterwards (`build.build_parallel_model` does both): nothing here allocates or
    communicates weights. A materialised model works too (tests), its values kept.

    Without pipeline parallelism the model is modified in place and is `parts[0]`; with it, `parts`
    are this rank's `TransformerStage`s. Every rank must call this (it creates groups).
    """
    cfg = model.config
    dims.validate(dist.get_world_size(), cfg)
    recompute_ids = recompute_layer_ids(cfg, recompute, stage_layers(cfg, dims.n_stages, offset), recompute_layers)
    parts: list[nn.Module] = build_stages(model, meshes, offset) if dims.pp > 1 else [model]
    for part in parts:
        for m in part.moe_layers():
            parallelize_moe(m, meshes)
        if dims.tp > 1:
            apply_tp(part, meshes.tp_mesh, dims.seq_parallel)
        apply_recompute(part, recompute, recompute_ids)
        if dims.dp_shard == "fsdp" and dims.dp > 1:
            apply_fsdp(part, meshes.dp_mesh, param_dtype, reshard_after_forward=dims.pp == 1)
    dm = DistributedModel(parts, meshes, mtp_lambda)
    dm.act_dtype = param_dtype or torch.float32
    if dims.pp > 1:  # the schedule itself is built at the first step, when the batch shape is known
        dm._embed_group = _embed_groups(meshes, dm._last_stage_rank()) if cfg.num_nextn_predict_layers else None
    return dm


def build_optimizer(dm: DistributedModel, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8):
    """AdamW over this rank's parameters (ZeroRedundancyOptimizer over dp when dp_shard = 'zero1').
    foreach=False: one rank mixes FSDP DTensors, ep DTensors and plain tensors."""
    params = list(dm.parameters())
    if dm.dims.dp_shard == "zero1" and dm.dims.dp > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(params, torch.optim.AdamW, process_group=dm.meshes.dense.get_group("dp"),
                                       lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, foreach=False)


@torch.no_grad()
def clip_grad_norm_(dm: DistributedModel, max_norm: float) -> torch.Tensor:
    """Global gradient 2-norm over every rank's parameters, each counted once; scales the grads
    to `max_norm` when above it. DTensor grads (FSDP, TP, EP shards) reduce over their own mesh;
    plain grads are already identical on their replicas (after `finalize_grads`); stages add up
    over the pipeline group (the last stage's embedding copy is stage 0's, not counted again)."""
    dev = dm.meshes.device
    total = torch.zeros((), dtype=torch.float32, device=dev)
    grads = []
    for part in dm.parts:
        copy = getattr(part, "is_last", False) and not getattr(part, "is_first", True)
        for name, p in part.named_parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            if copy and name == "model.embed_tokens.weight":
                continue
            n = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
            total += (n.full_tensor() if isinstance(n, DTensor) else n) ** 2
    if dm.dims.pp > 1:
        dist.all_reduce(total, group=dm.meshes.pp_group)
    norm = total.sqrt()
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        for g in grads:
            g.mul_(coef)
    return norm


def train_step(dm: DistributedModel, optimizer, window: torch.Tensor, bias_gamma: float = 0.0) -> float:
    """One optimizer step on a global batch window [B, T+1]; returns the global mean loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = dm.forward_backward(window)
    dm.finalize_grads()
    dm.reduce_expert_counts()
    update_expert_bias([m for p in dm.parts for m in p.modules() if isinstance(m, MoE)], bias_gamma)
    optimizer.step()
    return loss
