"""Activation recompute, applied from outside the model (torch.utils.checkpoint through
`checkpoint_wrapper` around whole decoder blocks, as torchtitan does).

`train.recompute`:
* none      activations of every layer are kept for backward;
* full      a wrapped block keeps only its input; its forward runs again during backward;
* selective as full, but the outputs of matrix products and attention kernels are kept
            (torch's selective-checkpoint policy): norms, activations, RoPE and routing are
            recomputed, the GEMMs are not.
Which blocks: every decoder layer and MTP block, or with `parallel.recompute_layers` (MindSpore
`recompute_config.recompute` as a list) the first N layers of each pipeline stage (the stage's
layers in order, its MTP layers last, as `pp.stage_layers` cuts them).

A recomputed forward must not count twice what the model records as a side effect (each MoE's
`tokens_per_expert` and, under pipeline parallelism, `aux_accum`/`aux_loss`): the recompute context
restores them, so losses and the bias update are identical with and without recompute.
Parameter names gain `_checkpoint_wrapped_module.`; state dicts and DCP strip it (torch does), and
`dsv3.parallel.init.canonical_name` strips it for the init.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dsv3.model.mla import MLA
from dsv3.model.moe import MoE

class KeepSideEffects:
    """Restores the MoE bookkeeping (counts, balance losses) a forward run again (recompute) or run
    only for shape inference (a pipeline schedule's first call) would add to."""

    def __init__(self, module: nn.Module):
        self.moes = [m for m in module.modules() if isinstance(m, MoE)]
        self.attns = [m for m in module.modules() if isinstance(m, MLA) and m.indexer is not None]

    def __enter__(self):
        self.saved = [(m.tokens_per_expert.clone(), getattr(m, "aux_accum", None), m.aux_loss) for m in self.moes]
        self.saved_idx = [(m.indexer_accum, m.indexer_loss) for m in self.attns]
        return self

    def __exit__(self, *exc):
        for m, (counts, accum, aux) in zip(self.moes, self.saved):
            m.tokens_per_expert.copy_(counts)
            if accum is not None:
                m.aux_accum = accum
            m.aux_loss = aux
        for m, (accum, loss) in zip(self.attns, self.saved_idx):
            m.indexer_accum, m.indexer_loss = accum, loss
        return False


def _save_ops() -> set:
    aten = torch.ops.aten
    names = ["mm.default", "addmm.default", "bmm.default", "_grouped_mm.default", "linear.default",
             "_scaled_dot_product_flash_attention.default", "_scaled_dot_product_efficient_attention.default",
             "_scaled_dot_product_cudnn_attention.default", "_scaled_dot_product_flash_attention_for_cpu.default"]
    ops = set()
    for n in names:
        packet, overload = n.split(".")
        if hasattr(aten, packet):
            ops.add(getattr(getattr(aten, packet), overload))
    return ops


def _context_fn(module: nn.Module, selective: bool):
    def fn():
        keep = KeepSideEffects(module)
        if not selective:
            return contextlib.nullcontext(), keep
        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

        save = _save_ops()

        def policy(ctx, op, *args, **kwargs):
            return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

        fwd, rec = create_selective_checkpoint_contexts(policy)

        @contextlib.contextmanager
        def recompute_ctx():
            with keep, rec:  # keep first: its clone/copy_ are not ops of the checkpointed region
                yield

        return fwd, recompute_ctx()
    return fn


def wrap(block: nn.Module, mode: str) -> nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                              context_fn=_context_fn(block, mode == "selective"), preserve_rng_state=False)


def apply_recompute(part: nn.Module, mode: str, layer_ids: set[int]) -> int:
    """Wrap the decoder layers (and MTP blocks) of a Transformer / TransformerStage whose id is in
    `layer_ids`; returns how many were wrapped. Apply after TP/EP and before FSDP."""
    if mode == "none" or not layer_ids:
        return 0
    n = 0
    layers = part.model.layers
    keys = list(layers.keys()) if isinstance(layers, nn.ModuleDict) else list(range(len(layers)))
    for k in keys:
        layer = layers[k]
        if layer.layer_idx in layer_ids:
            layers[k] = wrap(layer, mode)
            n += 1
    for mod in getattr(part.model, "mtp", None) or []:
        if mod.block.layer_idx in layer_ids:
            mod.block = wrap(mod.block, mode)
            n += 1
    return n
