"""Pipeline parallelism with `torch.distributed.pipelining`.

The model is cut into `n_stages = pp x v` stages by whole decoder layers (`layout.stage_layers`:
remainder to the earlier stages, or MindSpore's per-stage `offset`). Stages are made of the (meta)
model's own modules, never copies of the whole model. Stage 0 holds the embedding; the last stage holds the final norm, lm_head and the MTP
modules. MTP needs the embedding too (tied), so the last stage keeps its own copy of
`model.embed_tokens` and `tie_embedding_grads` sums the two copies' gradients after backward
(Megatron's embedding group), keeping them identical.

A stage is a `TransformerStage` whose attribute names are the Transformer's (`model.layers.{i}` with
the ORIGINAL layer index, `model.norm`, `lm_head`, ...), so state-dict keys are the single-process
keys and DCP checkpoints reshard across layouts. Every stage receives the token ids as a keyword
argument (the schedule hands kwargs to every stage), which the last stage needs for MTP.

Stage -> rank: "loop" (rank r holds r, r+pp, ...) for interleaved schedules, "v" (rank r holds r and
2pp-1-r) for ZBVZeroBubble / DualPipeV.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import get_schedule_class
from torch.distributed.tensor import DTensor, Replicate, Shard

from dsv3.errors import UserError
from dsv3.model.transformer import Transformer


def stage_ids(pp_rank: int, pp: int, v: int, style: str) -> list[int]:
    if v == 1:
        return [pp_rank]
    if style == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(v)]


def stage_owners(dims) -> dict[int, int]:
    """Pipeline rank of every stage."""
    style = "v" if dims.schedule in ("ZBVZeroBubble", "DualPipeV") else "loop"
    return {s: r for r in range(dims.pp) for s in stage_ids(r, dims.pp, dims.v, style)}


class _Backbone(nn.Module):
    """Holder with the Backbone's attribute names; absent parts are None."""


class TransformerStage(nn.Module):
    """A contiguous piece of the Transformer with the Transformer's parameter names."""

    rope = Transformer.rope
    mtp_hidden = Transformer.mtp_hidden
    mtp_logits = Transformer.mtp_logits
    moe_layers = Transformer.moe_layers

    def __init__(self, full: Transformer, stage_index: int, layer_ids: list[int], is_first: bool, is_last: bool,
                 tp_mesh=None, seq_placement=Replicate()):
        super().__init__()
        self.config = full.config
        self.stage_index, self.is_first, self.is_last = stage_index, is_first, is_last
        self.tp_mesh, self.seq_placement = tp_mesh, seq_placement
        self._shapes_inferred = False
        m = _Backbone()
        m.embed_tokens = None
        if is_first:
            m.embed_tokens = full.model.embed_tokens
        elif is_last and len(full.model.mtp):  # its own copy (another rank, or another stage of this one)
            m.embed_tokens = copy.deepcopy(full.model.embed_tokens)
        m.layers = nn.ModuleDict({str(i): full.model.layers[i] for i in layer_ids})
        m.norm = full.model.norm if is_last else None
        m.mtp = full.model.mtp if is_last else nn.ModuleList()
        self.model = m
        self.lm_head = full.lm_head if is_last else None
        self.rotary = full.rotary

    def expect_shape_inference(self) -> None:
        """The next call is a new schedule's shape inference: keep its routing out of the counts."""
        self._shapes_inferred = False

    def forward(self, h: torch.Tensor | None = None, *, tokens: torch.Tensor, positions: torch.Tensor | None = None):
        if not self._shapes_inferred:
            # The runtime's first call infers the stage's shapes (on the first micro-batch, or on
            # uninitialised buffers after stage 0): keep its routing out of the balancing counts.
            self._shapes_inferred = True
            from dsv3.parallel.recompute import KeepSideEffects

            with KeepSideEffects(self):
                return self._forward(h, tokens, positions)
        return self._forward(h, tokens, positions)

    def _forward(self, h: torch.Tensor | None, tokens: torch.Tensor, positions: torch.Tensor | None):
        """First stage: tokens [b,T] -> h. Middle: h -> h. Last: h -> (logits, *mtp_logits).
        Between stages h is this rank's local piece (the SP shard under tensor parallelism)."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = self.rope(positions)
        if self.is_first:
            h = self.model.embed_tokens(tokens)
        elif self.tp_mesh is not None:
            h = DTensor.from_local(h, self.tp_mesh, [self.seq_placement], run_check=False)
        for layer in self.model.layers.values():
            h = layer(h, cos, sin)
        if not self.is_last:
            return h.to_local() if isinstance(h, DTensor) else h
        post = self.model.norm(h)
        logits = self.lm_head(post)
        if not len(self.model.mtp):
            return logits
        h0 = post if self.config.mtp_hidden == "post_norm" else h
        return (logits, *self.mtp_logits(self.mtp_hidden(h0, tokens, positions)))


def build_stages(model: Transformer, meshes) -> list[TransformerStage]:
    """This rank's stages, made of `model`'s own modules (build `model` on the meta device: nothing
    is copied or allocated). The last stage's embedding copy (for MTP, when the stage is not also
    the first) is a fresh module of the same name; `init_weights` gives it stage 0's values."""
    dims = meshes.dims
    n_stages = dims.n_stages
    per_stage = dims.stage_layers(model.config)
    style = "v" if dims.schedule in ("ZBVZeroBubble", "DualPipeV") else "loop"
    stages = []
    for s in stage_ids(meshes.pp_rank, dims.pp, dims.v, style):
        tp = dict(tp_mesh=meshes.tp_mesh, seq_placement=Shard(1) if dims.seq_parallel else Replicate()) if dims.tp > 1 else {}
        stages.append(TransformerStage(model, s, per_stage[s], s == 0, s == n_stages - 1, **tp))
    return stages


def build_schedule(stages: list[nn.Module], meshes, loss_fn):
    """PipelineStage objects and the named schedule over them."""
    dims = meshes.dims
    try:
        cls = get_schedule_class(dims.schedule)
    except ValueError as e:
        raise UserError(f"pipeline schedule {dims.schedule!r} is not provided by this torch: {e}") from None
    if dims.reduce_every_microbatch:
        from dsv3.parallel.fsdp import ReduceEveryMicrobatchStage as stage_cls
    else:
        stage_cls = PipelineStage
    pstages = [stage_cls(st, st.stage_index, dims.n_stages, meshes.device, group=meshes.pp_group) for st in stages]
    if dims.v == 1:
        return cls(pstages[0], n_microbatches=dims.micro_batch_num, loss_fn=loss_fn)
    schedule = cls(pstages, n_microbatches=dims.micro_batch_num, loss_fn=loss_fn)
    if dualpipe_overlap(dims, stages):
        from torch.distributed.pipelining.schedules import OVERLAP_F_B

        from dsv3.parallel.overlap import overlap_f_b

        schedule.register_custom_function(OVERLAP_F_B, overlap_f_b)
    return schedule


def dualpipe_overlap(dims, stages: list[nn.Module]) -> bool:
    """Whether DualPipeV's paired chunks run overlapped (`parallel.dualpipe_overlap`, `dsv3.parallel.overlap`)."""
    from dsv3.parallel.overlap import overlap_blocker

    if dims.dualpipe_overlap is False or dims.schedule != "DualPipeV":
        return False
    blocker = overlap_blocker(dims, stages)
    if blocker and dims.dualpipe_overlap:
        raise UserError(f"parallel.dualpipe_overlap = true: {blocker}; set it to false or null")
    return blocker is None
