"""Tensor + sequence parallelism through DTensor plans (`parallelize_module`).

Per decoder layer (Megatron's MLA recipe, torchtitan's plan):
    input_layernorm, post_attention_layernorm   SequenceParallel (activations Shard(1) on the tp mesh)
    self_attn input                             all-gather Shard(1) -> Replicate
    q_a_proj, q_a_layernorm, kv_a_proj_with_mqa, kv_a_layernorm
                                                replicated (low-rank down-projections, small)
    q_b_proj, kv_b_proj                         column-parallel: heads split over tp
    o_proj                                      row-parallel, output reduce-scattered to Shard(1)
    self_attn.indexer (DSA, V3.2)               replicated, its KL target all-reduced (`indexer_plan`)
    dense MLP, MoE shared experts               gate/up column-parallel, down row-parallel
    MoE router and routed experts               work on the local sequence shard (see ep.py)
Top level: embedding row-parallel (vocab split) -> Shard(1); final norm SequenceParallel; lm_head
column-parallel with the logits gathered (Replicate) so the loss is the single-device loss.
Without sequence parallel every "Shard(1)" above is "Replicate".

Two things the plan alone cannot express, done here from outside the model:
* each MLA becomes a `TPMLA` (built on the meta device in its place) whose `n_heads` is the local
  head count (the model views q/kv with it).
* the shared rope key k_pe feeds every head, so on one tp rank its gradient is only that rank's
  heads' share: `TPMLA.project_latent` marks it Partial so autograd sums it over tp.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from dsv3.model.layers import MLP
from dsv3.model.mla import MLA
from dsv3.model.moe import MoE
from dsv3.model.rope import apply_rope


class ReplicateParallel(ParallelStyle):
    """Weights replicated on the tp mesh (as DTensors, so autograd reduces their gradients);
    a plain-tensor input is taken to have `input_layout`; the output stays a DTensor."""

    def __init__(self, input_layout=Replicate()):
        super().__init__()
        self.input_layout = input_layout

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        def prepare_input(mod, inputs, mesh):
            x = inputs[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [self.input_layout], run_check=False)
            return (x, *inputs[1:])

        def partition(name, mod, mesh):
            for pname, p in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(pname, nn.Parameter(distribute_tensor(p.data, mesh, [Replicate()], src_data_rank=None), requires_grad=p.requires_grad))

        return distribute_module(module, device_mesh, partition, prepare_input)


class TPMLA(MLA):
    """MLA over this rank's heads (its weights are built whole on the meta device and sharded by the
    plan), whose k_pe gradient is summed over the tp ranks (each rank holds only its heads)."""

    def __init__(self, cfg, tp: int):
        super().__init__(cfg)
        self.n_heads = cfg.num_attention_heads // tp  # the local head count the projections are viewed with

    def project_latent(self, x, cos, sin):
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = k_pe.to_local(grad_placements=[Partial()])  # [B,T,R], full on every rank
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)

    @torch.no_grad()
    def indexer_target(self, q_nope, q_pe, c_kv, k_pe, keep):
        """DSA's KL target sums the attention weights over ALL heads: this rank's heads' sum, all-reduced
        over tp (no grad: the target is detached). Every rank then holds the one-process target."""
        w = self.kv_b_proj.weight  # Shard(0) over tp: this rank's heads
        w_uk = w.to_local().view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)[:, : self.nope_dim]
        c_kv = c_kv.to_local() if isinstance(c_kv, DTensor) else c_kv
        part = self.attention_probs(q_nope, q_pe, c_kv, k_pe, keep, w_uk).sum(1)  # [B,T,S]
        return DTensor.from_local(part, w.device_mesh, [Partial()], run_check=False).full_tensor()


class LocalReplicateParallel(ReplicateParallel):
    """`ReplicateParallel` whose output is handed on as this rank's plain tensor, its gradient taken
    as Replicate (the same on every rank: the consumer computes the same thing everywhere)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        module = super()._apply(module, device_mesh)
        module.register_forward_hook(lambda mod, inp, out: out.to_local(grad_placements=[Replicate()]))
        return module


def indexer_plan(layer: nn.Module) -> dict[str, ParallelStyle]:
    """DSA's lightning indexer (V3.2) under tp: replicated, not sharded over its heads.

    Its input is the attention's, already whole on every rank (gathered from the sequence shards
    under sequence parallelism), so every rank computes the same scores, the same top-k and, with the
    all-reduced target (`TPMLA.indexer_target`), the same KL loss: each rank's weight gradient is
    the whole gradient and needs no reduction (Replicate). Sharding its G heads would need the
    head-weighted scores [B,T,S] all-reduced in the forward (the top-k reads them whole) and again in
    the backward, for weights of (Q·G·E + D·E + D·G) values, small beside MLA's; replicating keeps
    the selection exactly the one-process selection. The indexer's math runs on plain tensors
    (`LocalReplicateParallel`)."""
    if layer.self_attn.indexer is None:
        return {}
    return {f"self_attn.indexer.{n}": LocalReplicateParallel() for n in ("wq_b", "wk", "k_norm", "weights_proj")}


def _seq(sp: bool):
    return Shard(1) if sp else Replicate()


def layer_plan(layer: nn.Module, sp: bool, tp: int) -> dict[str, ParallelStyle]:
    """Plan for one DecoderLayer (main or MTP block); keys relative to the layer."""
    seq = _seq(sp)
    norm = SequenceParallel() if sp else ReplicateParallel()
    plan: dict[str, ParallelStyle] = {
        "input_layernorm": norm,
        "post_attention_layernorm": norm,
        "self_attn": PrepareModuleInput(input_layouts=(seq, None, None, None, None),
                                        desired_input_layouts=(Replicate(), None, None, None, None)),
        "self_attn.kv_a_proj_with_mqa": ReplicateParallel(),
        "self_attn.kv_a_layernorm": ReplicateParallel(),
        "self_attn.kv_b_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=seq, use_local_output=False),
    }
    if layer.self_attn.q_lora_rank is None:
        plan["self_attn.q_proj"] = ColwiseParallel()
    else:
        plan.update({"self_attn.q_a_proj": ReplicateParallel(), "self_attn.q_a_layernorm": ReplicateParallel(),
                     "self_attn.q_b_proj": ColwiseParallel()})
        plan.update(indexer_plan(layer))
    if isinstance(layer.mlp, MLP):
        plan.update(mlp_plan("mlp", seq))
    elif isinstance(layer.mlp, MoE):
        plan.update(moe_plan(layer.mlp, seq))
    return plan


def mlp_plan(prefix: str, seq) -> dict[str, ParallelStyle]:
    """A SwiGLU MLP at `prefix`: input gathered to Replicate, gate/up column-parallel, down row-parallel
    with its output reduce-scattered back to the sequence layout `seq`."""
    return {prefix: PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            f"{prefix}.gate_proj": ColwiseParallel(), f"{prefix}.up_proj": ColwiseParallel(),
            f"{prefix}.down_proj": RowwiseParallel(output_layouts=seq, use_local_output=False)}


def moe_plan(moe: nn.Module, seq) -> dict[str, ParallelStyle]:
    """A MoE layer (`ep.ParallelMoE`): its shared experts split like the dense MLP. The router and
    routed experts are not in the plan: every tp rank routes its own sequence shard with the whole
    router (FSDP-sharded over dp, `fsdp.shard_moe`) and the experts are split over ep."""
    return mlp_plan("mlp.shared_experts", seq) if moe.shared_experts is not None else {}


def apply_tp(part: nn.Module, tp_mesh, sp: bool) -> None:
    """Apply the plan to a Transformer or a pipeline stage holding a subset of it (same names)."""
    tp = tp_mesh.size()
    seq = _seq(sp)
    backbone = part.model
    top: dict[str, ParallelStyle] = {}
    if getattr(backbone, "embed_tokens", None) is not None:
        # Always Shard(1) out of the vocab-split embedding: its masked-partial output cannot take a summed
        # gradient from a Replicate consumer; without SP the hook below gathers it.
        top["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False)
    if getattr(backbone, "norm", None) is not None:
        top["model.norm"] = SequenceParallel() if sp else ReplicateParallel()
    if getattr(part, "lm_head", None) is not None:
        top["lm_head"] = ColwiseParallel(input_layouts=seq, output_layouts=Replicate(), use_local_output=True)
    layers = backbone.layers.items() if isinstance(backbone.layers, nn.ModuleDict) else enumerate(backbone.layers)
    blocks = [(f"model.layers.{i}", layer) for i, layer in layers]
    for k, mod in enumerate(getattr(backbone, "mtp", None) or []):
        blocks.append((f"model.mtp.{k}.block", mod.block))
        norm = SequenceParallel() if sp else ReplicateParallel()
        top.update({f"model.mtp.{k}.enorm": norm, f"model.mtp.{k}.hnorm": norm,
                    f"model.mtp.{k}.shared_head.norm": norm, f"model.mtp.{k}.eh_proj": ReplicateParallel(seq)})
    for prefix, layer in blocks:
        if not layer.self_attn.o_proj.weight.is_meta:
            raise ValueError(f"apply_tp: {prefix} is materialised; build the model on the meta device")
        with torch.device("meta"):
            layer.self_attn = TPMLA(part.config, tp)
        for name, style in layer_plan(layer, sp, tp).items():
            top[f"{prefix}.{name}"] = style
    # src_data_rank=None: no broadcast/scatter; the model is on the meta device and `init_weights` fills the shards
    parallelize_module(part, tp_mesh, top, src_data_rank=None)
    if not sp and "model.embed_tokens" in top:
        backbone.embed_tokens.register_forward_hook(lambda mod, inp, out: out.redistribute(tp_mesh, [Replicate()]))
