"""FP8 mixed-precision training as DeepSeek-V3 describes it (report §3.3), emulated on any device.

Which products: the model's linear layers (attention projections, dense and shared-expert MLPs, the
MTP blocks' projections) run their three GEMMs on FP8 (e4m3) operands; the embedding, the output
head, the router, the MTP `eh_proj`, norms, attention itself and the routed experts' grouped GEMMs stay
in the run's precision, as do master weights, gradients and optimizer states (fp32).

Scaling (fine-grained, as the report's Figure 7):
* activations and output gradients: per 1x128 tile (one token, 128 channels), scale = amax / 448;
* weights: per 128x128 block.
So Fprop is Q(x)·Q(W)ᵀ, Dgrad is Q(dy)·Q(W) and Wgrad is Q(dy)ᵀ·Q(x), every product accumulated in
fp32. The emulation quantises and dequantises (QDQ) each operand and multiplies in fp32: the values
are exactly the FP8 ones; what it does not model is the tensor cores' limited accumulation width
(the report promotes partial sums to fp32 every 128 elements, which fp32 accumulation bounds) and the
report's 128x1 tiles for Wgrad's activation operand (1x128 tiles are used for both products here).
Weights' quantisation is straight-through for their gradient (the fp32 master weight gets dW).

Applied from outside, before any parallelism (`train.fp8: true`; `enable_fp8_training(model)` replaces
each eligible `nn.Linear` by an `Fp8Linear` holding the same Parameter), so the model maths and checkpoints
are unchanged. Not with tensor parallelism (its DTensor shards would be quantised per shard).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.checkpoint.fp8 import BLOCK, weight_dequant, weight_quant
from dsv3.model.qdq import qdq_tiles

KEEP = ("lm_head", "eh_proj", "gate")
"""Module leaf names kept in the run's precision (the report's exceptions that are linear layers)."""


def qdq_blocks(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Quantise w [N, K] to e4m3 per `block` x `block` block and back (DeepSeek's weight format)."""
    q, s = weight_quant(w, block)
    return weight_dequant(q, s, block, dtype=w.dtype)


class Fp8LinearFn(torch.autograd.Function):
    """y = Q(x) Q(W)ᵀ; dx = Q(dy) Q(W); dW = Q(dy)ᵀ Q(x) (module docstring), products in fp32. The output
    has the autocast dtype when autocast is on (as a BF16 run's FP8 GEMMs write BF16), else x's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        xq, wq = qdq_tiles(x.float()), qdq_blocks(w.float())
        ctx.save_for_backward(xq, wq)
        ctx.dtypes = (x.dtype, w.dtype)
        with torch.autocast(dev, enabled=False):
            return F.linear(xq, wq).to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xq, wq = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        dq = qdq_tiles(dy.float())
        dx = (dq @ wq).to(x_dtype) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dq.reshape(-1, dq.shape[-1]).t() @ xq.reshape(-1, xq.shape[-1])).to(w_dtype)
        return dx, dw


class Fp8Linear(nn.Linear):
    """An `nn.Linear` whose products run on FP8 operands (`Fp8LinearFn`); same parameters and names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            raise ValueError("Fp8Linear: DeepSeek-V3's linear layers have no bias")
        return Fp8LinearFn.apply(x, self.weight)


def enable_fp8_training(model: nn.Module) -> int:
    """Replace every eligible `Linear` of `model` (not the `KEEP` ones) by an `Fp8Linear` holding the
    same weight Parameter; returns how many. Call before any parallel wrapping."""
    n = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and name.rsplit(".", 1)[-1] not in KEEP:
            new = Fp8Linear(mod.in_features, mod.out_features, bias=False, device="meta")
            new.weight = mod.weight
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, new)
            n += 1
    return n
