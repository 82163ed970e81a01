"""Expert parallelism: routed experts split over the ep ranks, tokens moved with all-to-all.

Data path of one MoE layer on one rank (torchtitan's AllToAllTokenDispatcher, without padding):
    route locally -> sort (token, slot) pairs by expert -> all-to-all of per-expert counts (no grad)
    -> one host sync for the split sizes -> all-to-all of the token rows (autograd) -> reorder
    rank-major (e0,r0),(e1,r0),... to expert-major (e0,r0),(e0,r1),... -> grouped expert compute
    -> inverse reorder -> reverse all-to-all -> scale by the fp32 gate weight -> index_add into [N,D].

The model's `MoE` keeps its single-device maths; `ParallelMoE` is a subclass with the same
parameter names (checkpoints map one to one) and a distributed `forward`. `parallelize_moe` builds one
on the meta device in place of each `MoE` of a (meta) model, as `parallelize_module` replaces
modules; the weights are materialised and initialised afterwards. Under tensor parallelism the MoE works on this rank's slice of the sequence (the
SP shard), so every rank of dp x tp routes different tokens; its input/output are DTensors on the tp
mesh and the boundary converts them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

from dsv3.kernels.grouped import grouped_swiglu
from dsv3.model.layers import AttachLoss
from dsv3.model.moe import Experts, MoE
from dsv3.parallel.overlap import sync


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the backward sends gradients back along the reverse splits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows of x [sum(in_splits), ...] go to ranks by `in_splits`; returns [sum(out_splits), ...]."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _local_experts(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's expert weights as plain tensors (DTensor Shard(0) on the ep mesh -> local slice)."""
    ws = (experts.gate_proj, experts.up_proj, experts.down_proj)
    return tuple(w.to_local() if isinstance(w, DTensor) else w for w in ws)


class ParallelExperts(Experts):
    """`Experts` whose weights are this rank's Shard(0) slice on the ep mesh (DTensors) and whose
    grouped forward exchanges tokens over `ep_group` (both expert paths take it). `grouped_swiglu`
    always connects xs and every local weight to the output, even with zero rows: a rank that
    received no tokens still runs the backward all-to-all its peers run."""

    swiglu = staticmethod(grouped_swiglu)
    """The expert product over sorted slices; a module swapped in before parallelism (FP8 training's
    `Fp8Experts`) brings its own and `parallelize_moe` carries it over."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, ep_group=None, ep_size: int = 1):
        super().__init__(n_experts, dim, inter_dim)
        self.ep_group, self.ep_size = ep_group, ep_size

    def forward_grouped(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N,D], w [N,K] fp32, idx [N,K] global expert ids -> routed-expert output [N,D]."""
        gate_w, up_w, down_w = _local_experts(self)
        N, K = idx.shape
        L = gate_w.shape[0]  # experts on this rank
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        tok = order // K
        xs = x[tok]  # [N·K, D] sorted by expert id
        counts = torch.bincount(flat, minlength=self.n_experts)  # [E]
        if self.ep_size == 1:
            ys = self.swiglu(xs, counts.tolist(), gate_w, up_w, down_w)
        else:
            # recv[r, l] = rows rank r sends to my local expert l; sync(): DualPipe's overlap turns (overlap.py)
            xs = sync(xs, "A")
            recv = torch.empty_like(counts)
            dist.all_to_all_single(recv, counts, group=self.ep_group)
            send_counts, recv = counts.view(self.ep_size, L), recv.view(self.ep_size, L)
            in_splits = send_counts.sum(1).tolist()
            out_splits = recv.sum(1).tolist()  # the host sync
            got = sync(all_to_all(xs, out_splits, in_splits, self.ep_group), "B")  # [M,D] rank-major
            # rank-major -> expert-major: a stable sort of the received rows by local expert
            local_e = torch.repeat_interleave(torch.arange(L, device=x.device).repeat(self.ep_size), recv.flatten())
            perm = local_e.argsort(stable=True)
            ys_sorted = self.swiglu(got[perm], recv.sum(0).tolist(), gate_w, up_w, down_w)
            ys_back = torch.empty_like(ys_sorted).index_copy(0, perm, ys_sorted)  # undo the reorder
            ys = sync(all_to_all(sync(ys_back, "C"), in_splits, out_splits, self.ep_group), "D")
        ys = ys.float() * w.flatten()[order, None]
        return torch.zeros_like(x, dtype=torch.float32).index_add_(0, tok, ys).to(x.dtype)

    forward_loop = forward_grouped


class ParallelMoE(MoE):
    """`MoE` whose router and routed experts work on this rank's sequence shard under TP (input/output
    DTensors on `tp_mesh`); the routing, counts and expert maths are the model's own code. The shared
    experts run on the layer's DTensor input like the dense MLP (tensor-parallel by `tp.moe_plan`).
    Under TP the sequence-wise balance loss is taken over whole sequences (its statistics summed over
    the tp ranks); `attach_aux` (pipeline parallel) routes it into the backward through the activations."""

    def __init__(self, cfg, tp_mesh=None, attach_aux: bool = False, ep_group=None, ep_size: int = 1):
        super().__init__(cfg)
        self.experts = ParallelExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, ep_group, ep_size)
        self.tp_mesh, self.attach_aux = tp_mesh, attach_aux
        self.aux_accum = 0.0  # balance losses of the micro-batches since `reset_aux_accum` (pipeline log)

    def reset_aux_accum(self) -> None:
        self.aux_accum = 0.0

    def forward(self, x):
        if isinstance(x, DTensor):
            # Route this rank's sequence shard; a Replicate input is sliced here and gathered back below.
            placements = x.placements
            y = self._routed_in_param_dtype(x.redistribute(self.tp_mesh, [Shard(1)]).to_local())
            y = DTensor.from_local(y, self.tp_mesh, [Shard(1)]).redistribute(self.tp_mesh, placements)
        else:
            y = self._routed_in_param_dtype(x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if self.attach_aux and self.training and self.aux_loss_alpha > 0 and torch.is_grad_enabled():
            y = AttachLoss.apply(y, self.aux_loss)
            self.aux_accum = self.aux_accum + self.aux_loss.detach()  # for reporting: summed over micro-batches
        return y

    def _routed_in_param_dtype(self, x: torch.Tensor) -> torch.Tensor:
        # The router and routed experts are their own FSDP units without a param_dtype (the router
        # stays fp32), so the routed part computes in their stored dtype and hands back the activation dtype.
        dtype = self.gate.weight.dtype
        return self.routed(x.to(dtype)).to(x.dtype)

    def balance_loss(self, s: torch.Tensor) -> torch.Tensor:
        """`sequence_balance_loss` over the full sequences when each tp rank holds T/tp of them (s [B,T/tp,E])."""
        if self.tp_mesh is None:
            return super().balance_loss(s)
        B, T_local, E = s.shape
        K, T = self.top_k, T_local * self.tp_mesh.size()
        with torch.no_grad():
            counts = torch.zeros(B, E, device=s.device).scatter_add_(1, s.topk(K, dim=-1).indices.flatten(1),
                                                                     torch.ones(B, T_local * K, device=s.device))
            dist.all_reduce(counts, group=self.tp_mesh.get_group())
            f = counts * (E / (K * T))
        p_sum = (s / s.sum(-1, keepdim=True)).sum(1)  # [B,E], this rank's tokens
        p = DTensor.from_local(p_sum, self.tp_mesh, [Partial()]).full_tensor() / T
        return self.aux_loss_alpha * (f * p).sum(-1).mean()


def parallelize_moe(part: nn.Module, cfg, meshes) -> None:
    """Replace every `MoE` of the meta-device `part` by a `ParallelMoE` (experts Shard(0) over the
    ep mesh as DTensors, so checkpoints see the global [E,I,D] tensors; TP boundary when tp > 1)."""
    dims = meshes.dims
    ep = dict(ep_group=meshes.sparse.get_group("ep"), ep_size=dims.ep) if dims.ep > 1 else {}
    for name, moe in [(n, m) for n, m in part.named_modules() if isinstance(m, MoE)]:
        if not moe.gate.weight.is_meta:
            raise ValueError(f"parallelize_moe: {name} is materialised; build the model on the meta device")
        parent, _, attr = name.rpartition(".")
        with torch.device("meta"):
            new = ParallelMoE(cfg, tp_mesh=meshes.tp_mesh if dims.tp > 1 else None, attach_aux=dims.pp > 1, **ep)
        # what was swapped in before parallelism stays: the shared experts' module (FP8 / fast-path
        # linears) and the routed experts' product (FP8 training's `swiglu`)
        new.shared_experts = moe.shared_experts
        if hasattr(moe.experts, "swiglu"):
            new.experts.swiglu = moe.experts.swiglu
        if dims.ep > 1:
            for w in ("gate_proj", "up_proj", "down_proj"):
                p = getattr(new.experts, w)
                setattr(new.experts, w, nn.Parameter(distribute_tensor(p.data, meshes.ep_mesh, [Shard(0)], src_data_rank=None),
                                                     requires_grad=p.requires_grad))
        setattr(part.get_submodule(parent) if parent else part, attr, new)
