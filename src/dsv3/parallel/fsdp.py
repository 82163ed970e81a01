"""Data parallelism: FSDP2 (`fully_shard`) for the dense weights, explicit all-reduces for the rest.

FSDP2 wraps (torchtitan's recipe) the embedding, every decoder layer, every MTP module, [norm,
lm_head], then the root, on the dp mesh (2-D with TP: parameters are DTensors on [dp, tp]). The
shared experts are dense weights of their layer's unit (tensor-parallel like the dense MLP under TP).
Routed experts (EP-local, Shard(0) over ep) get their own FSDP unit per MoE on the edp mesh
(torchtitan's `dp_shard_mod_ep`), sharded along dim 1 (I of gate/up, D of down), so every rank keeps
1/edp of its experts and their gradients are reduce-scattered over edp. Each router (gate weight
[E, D]) is its own unit on the dp mesh without a param_dtype, so it is gathered and kept in fp32; its
`e_score_correction_bias` is a buffer (E floats, read whole by every routing) and stays replicated,
updated identically everywhere from the globally summed expert load (`dsv3.train.balance`). Under TP
every tp rank routes a different slice of the sequence with the whole router, so `sync_grads` sums
the routers' gradient shards over tp; without FSDP it all-reduces the routers over dp x tp itself
(and the routed experts when they are not sharded).

Gradient convention: each data-parallel replica's loss is the mean over its own batch, and the step
gradient is the mean over replicas (FSDP's default reduce-scatter average; the manual all-reduces
sum then divide by dp). Ranks that split one replica's tokens (tp) contribute sums.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._backward import stage_backward
from torch.distributed.tensor import DTensor, Shard

from dsv3.model.moe import MoE

# FSDP2 warns when a unit returns a view: an in-place op on it would drop the pre-backward hook (and
# the all-gather). The only such outputs here are the output head's logits, returned by the [norm,
# lm_head] unit, by the root and by a pipeline's last stage: on CPU fp32 `dsv3.kernels.onednn.linear_nt`
# views its [tokens, V] product as [B, T, V] (a copy would cost a whole logits tensor per call). Their
# consumers (`train.loss.masked_ce` / `mtp_loss`, also behind `PipelineRunner.loss`: slice, flatten,
# float, cross_entropy) are all out of place, so the hook always fires; test_parallel_fsdp checks the
# losses equal one process's with the warning gone. Any other unit returning a view still warns.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \((FSDPRMSNorm, FSDP(OneDNN)?Linear|FSDPTransformer|FSDPTransformerStage)\) "
                                          r"returned a view tensor")


def moe_params(part: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(router weights, routed-expert params) of every MoE in `part` (shared experts are dense)."""
    routers, exp = [], []
    for m in part.modules():
        if isinstance(m, MoE):
            routers += list(m.gate.parameters())
            exp += [m.experts.gate_proj, m.experts.up_proj, m.experts.down_proj]
    return routers, exp


def shard_moe(part: nn.Module, dp_mesh, edp_mesh=None, reshard_after_forward: bool = True) -> None:
    """fully_shard each MoE's router over `dp_mesh` and (with `edp_mesh`) its routed experts over
    `edp_mesh` (dim 1; dim 0 is ep's). Before the dense units, which then leave them alone. Both keep
    their stored dtype (no param_dtype: the router stays fp32, and the routed experts compute in the
    router's dtype, `ep.ParallelMoE`). The experts are resharded after forward also under PP: a
    stage's gathered experts would not fit. MoE calls `forward_grouped` / `forward_loop`, not `forward`."""
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for m in part.modules():
        if not isinstance(m, MoE):
            continue
        fully_shard(m.gate, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        if edp_mesh is not None:
            fully_shard(m.experts, mesh=edp_mesh, mp_policy=mp, reshard_after_forward=True,
                        shard_placement_fn=lambda p: Shard(1))
            for method in ("forward_grouped", "forward_loop"):
                register_fsdp_forward_method(m.experts, method)


def apply_fsdp(part: nn.Module, dp_mesh, param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True,
               edp_mesh=None) -> None:
    """fully_shard the dense modules of a Transformer / TransformerStage over `dp_mesh` (and the
    routers, and the routed experts over `edp_mesh` when given)."""
    exp = moe_params(part)[1]
    shard_moe(part, dp_mesh, edp_mesh, reshard_after_forward)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kw = dict(mesh=dp_mesh, mp_policy=mp, ignored_params=set(exp))
    backbone = part.model
    if getattr(backbone, "embed_tokens", None) is not None:
        fully_shard(backbone.embed_tokens, reshard_after_forward=reshard_after_forward, **kw)
    layers = backbone.layers.values() if isinstance(backbone.layers, nn.ModuleDict) else backbone.layers
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    for mod in getattr(backbone, "mtp", None) or []:
        # shared_head.norm is called from Transformer.mtp_logits, outside the MTP module's forward.
        fully_shard(mod.shared_head.norm, reshard_after_forward=False, **kw)
        fully_shard(mod, reshard_after_forward=reshard_after_forward, **kw)
    if getattr(part, "lm_head", None) is not None:
        # The head runs last: resharding it right after forward would only re-gather it for backward.
        fully_shard([backbone.norm, part.lm_head], reshard_after_forward=False, **kw)
    fully_shard(part, reshard_after_forward=reshard_after_forward, **kw)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _all_reduce_grads(params, group, divide: int) -> None:
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return
    # One flat buffer per call: fewer collectives (matters for gloo).
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= divide
    off = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[off : off + n].view_as(g))
        off += n


def sync_grads(parts: list[nn.Module], meshes, fsdp: bool) -> None:
    """All-reduce the gradients FSDP does not handle (see the module docstring)."""
    dims = meshes.dims
    routers, exp = [], []
    for part in parts:
        r, e = moe_params(part)
        routers += r
        exp += e
    if fsdp and dims.tp > 1:
        # FSDP averaged each router shard over dp; the tp ranks' shares (different tokens) add up
        _all_reduce_grads(routers, meshes.tp_mesh.get_group(), 1)
    elif not fsdp and dims.dp * dims.tp > 1:
        _all_reduce_grads(routers, meshes.tokens_group, dims.dp)
    if dims.shard_experts:
        # FSDP's reduce-scatter averaged over edp; the step gradient is the sum over edp / dp
        for p in exp:
            if p.grad is not None and dims.edp != dims.dp:
                _local(p.grad).mul_(dims.edp / dims.dp)
    elif dims.edp > 1:
        _all_reduce_grads(exp, meshes.edp_group, dims.dp)
    elif dims.dp > 1:
        # ep = dp x tp: the all-to-all already summed every replica's tokens into the one copy; a sum
        # of dp replica means still needs dividing (Adam hides a dp-times gradient, clipping and eps do not)
        for p in exp:
            if p.grad is not None:
                _local(p.grad).div_(dims.dp)
    if not fsdp and dims.dp > 1:
        ids = {id(p) for p in routers + exp}
        dense = [p for part in parts for p in part.parameters() if id(p) not in ids]
        _all_reduce_grads(dense, meshes.dense.get_group("dp"), dims.dp)


class ReduceEveryMicrobatchStage(PipelineStage):
    """A pipeline stage whose FSDP gradients are reduce-scattered after every micro-batch's backward
    (`parallel.reduce_grads_every_microbatch`). torch's stage runs every backward but the step's last
    under FSDP's no-sync (each unit's fp32 gradient kept unsharded, accumulated over the micro-batches,
    until `perform_reduce_grad`); here each backward runs with gradient sync on, so FSDP's post-backward
    reduce-scatters the unit's gradient as soon as it is formed and adds it to the sharded gradient.
    Weights stay gathered between forward and backward (reshard_after_backward off, as torch's no-sync
    path keeps them); `perform_reduce_grad` then finds nothing left to reduce and scales by the
    micro-batch count as before, so the step's gradient is the same sum."""

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
        if not isinstance(self.submod, FSDPModule):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        if backward_type != "full":  # refused by ParallelDims.validate (FULL_BACKWARD schedules only)
            raise RuntimeError(f"reduce_grads_every_microbatch runs full backwards only, got {backward_type!r}")
        self.submod.set_is_last_backward(False)
        self.submod.set_reshard_after_backward(False)
        self.submod.set_requires_gradient_sync(True)
        grads = stage_backward(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"])
        return grads, None
