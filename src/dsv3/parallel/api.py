"""`parallelize(model, dims, meshes)`: this rank's part of a layout as a `DistributedModel` (its
`parts`, the gradient reductions FSDP does not do, the global-norm clip). The training step itself is
the trainer's (`dsv3.train.trainer`), with the layout applied by `dsv3.train.strategy`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dsv3.model.transformer import Transformer
from dsv3.parallel.dims import Meshes, ParallelDims
from dsv3.parallel.ep import parallelize_moe
from dsv3.parallel.fsdp import _local, apply_fsdp, sync_grads
from dsv3.parallel.pp import build_stages
from dsv3.parallel.recompute import apply_recompute
from dsv3.parallel.tp import apply_tp


class DistributedModel:
    """The model parts this rank holds (the Transformer, or its pipeline stages) and their gradient reductions."""

    def __init__(self, parts: list[nn.Module], meshes: Meshes, embed_group: dist.ProcessGroup | None = None):
        self.parts, self.meshes, self.dims = parts, meshes, meshes.dims
        self._embed_group = embed_group  # stage 0's and the last stage's ranks, when both hold the embedding (MTP)
        self.fsdp = self.dims.fsdp

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


def _embed_groups(meshes: Meshes, last_rank: int) -> dist.ProcessGroup | None:
    """Groups {stage-0 rank, last-stage rank} with the same (dp, tp) coordinates; this rank's one."""
    dims = meshes.dims
    if last_rank == 0:
        return None
    mine = None
    mesh = meshes.dense.mesh.reshape(dims.pp, dims.dp, dims.tp)  # [pp, dp, tp] (HSDP's [pp, rep, shard, tp] flattened)
    for d in range(dims.dp):
        for t in range(dims.tp):
            ranks = sorted({int(mesh[0, d, t]), int(mesh[last_rank, d, t])})
            g = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                mine = g
    return mine


def parallelize(model: Transformer, dims: ParallelDims, meshes: Meshes, param_dtype: torch.dtype | None = None) -> DistributedModel:
    """Apply PP (this rank's stages, `dims.offset` per stage), EP, TP(+SP), activation recompute and
    FSDP/DDP to `model`, in that order (torchtitan's). Build `model` on the meta device and
    materialise afterwards (`build.build_parallel_model` does both): nothing here allocates or
    communicates weights.

    Without pipeline parallelism the model is modified in place and is `parts[0]`; with it, `parts`
    are this rank's `TransformerStage`s. Every rank must call this (it creates groups).
    """
    cfg = model.config
    dims.validate(dist.get_world_size(), cfg)
    recompute_ids = dims.recompute_ids(cfg)
    parts: list[nn.Module] = build_stages(model, meshes) if dims.pp > 1 else [model]
    for part in parts:
        parallelize_moe(part, cfg, meshes)
        if dims.tp > 1:
            apply_tp(part, meshes.tp_mesh, dims.seq_parallel)
        apply_recompute(part, dims.recompute, recompute_ids)
        if dims.fsdp:
            apply_fsdp(part, meshes.fsdp_mesh, param_dtype, reshard_after_forward=dims.pp == 1,
                       edp_mesh=meshes.edp_mesh if dims.shard_experts else None)
    embed_group = _embed_groups(meshes, dims.last_stage_rank) if dims.pp > 1 and cfg.num_nextn_predict_layers else None
    return DistributedModel(parts, meshes, embed_group)


@torch.no_grad()
def grad_norm(dm: DistributedModel) -> torch.Tensor:
    """Global gradient 2-norm over every rank's parameters, each counted once (the grads are not
    changed; `dsv3.train.optim.step_with_clip` applies the clip). DTensor grads (FSDP, TP, EP shards)
    reduce over their own mesh; plain grads are already identical on their replicas (after
    `finalize_grads`); stages add up over the pipeline group (the last stage's embedding copy is
    stage 0's, not counted again)."""
    dev = dm.meshes.device
    total = torch.zeros((), dtype=torch.float32, device=dev)
    for part in dm.parts:
        copy = getattr(part, "is_last", False) and not getattr(part, "is_first", True)
        for name, p in part.named_parameters():
            if p.grad is None or (copy and name == "model.embed_tokens.weight"):
                continue
            n = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
            total += (n.full_tensor() if isinstance(n, DTensor) else n) ** 2
    if dm.dims.pp > 1:
        dist.all_reduce(total, group=dm.meshes.pp_group)
    return total.sqrt()
