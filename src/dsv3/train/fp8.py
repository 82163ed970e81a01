"""FP8 mixed-precision training as DeepSeek-V3 describes it (report §3.3), emulated on any device.

Which products: the model's linear layers (attention projections, dense and shared-expert MLPs, the
MTP blocks' projections) and the routed experts' three projections run their three GEMMs on FP8 (e4m3)
operands; the embedding, the output head, the router, the MTP `eh_proj`, norms and attention itself
stay in the run's precision, as do master weights, gradients and optimizer states (fp32).

Scaling (fine-grained, as the report's Figure 7):
* activations and output gradients: per 1x128 tile (one token, 128 channels), scale = amax / 448;
* weights: per 128x128 block.
So Fprop is Q(x)·Q(W)ᵀ, Dgrad is Q(dy)·Q(W) and Wgrad is Q(dy)ᵀ·Q(x), every product accumulated in
fp32. The emulation quantises and dequantises (QDQ) each operand and multiplies in fp32: the values
are exactly the FP8 ones; what it does not model is the tensor cores' limited accumulation width
(the report promotes partial sums to fp32 every 128 elements, which fp32 accumulation bounds) and the
report's 128x1 tiles for Wgrad's activation operand (1x128 tiles are used for both products here).
Weights' quantisation is straight-through for their gradient (the fp32 master weight gets dW).

Where the products run: on a CUDA device whose block-scaled FP8 GEMM passes its probe
(`dsv3.quant.fp8_gemm.fp8_gemm_supported`: Hopper-class, `F.scaled_mm` with BlockWise1x128 x
BlockWise128x128 scales), Fprop and Dgrad run on the FP8 tensor cores from the quantised operands
(Dgrad's weight operand is the transposed block grid: same blocks, same scales); Wgrad, whose operands
need 1x128 scales on both sides along the token dimension (a combination that GEMM does not take), multiplies
the same FP8 values in fp32. Everywhere else (CPU, other GPUs, shapes that are not whole 128-blocks)
all three are emulated. Which path ran is logged once per device.

Applied from outside, before any parallelism (`train.fp8: true`; `enable_fp8_training(model)` replaces
each eligible `nn.Linear` by an `Fp8Linear` holding the same Parameter and turns `Experts` into
`Fp8Experts`, whose `swiglu` expert parallelism carries over), so the model maths and checkpoints are
unchanged. Not with tensor parallelism (its DTensor shards would be quantised per shard).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.checkpoint.fp8 import BLOCK, weight_dequant, weight_quant
from dsv3.model.moe import Experts
from dsv3.model.qdq import qdq_tiles
from dsv3.quant.fp8_gemm import fp8_block_linear, fp8_gemm_supported, shape_eligible

log = logging.getLogger(__name__)
_logged: set[str] = set()

KEEP = ("lm_head", "eh_proj", "gate")
"""Module leaf names kept in the run's precision (the report's exceptions that are linear layers)."""


def qdq_blocks(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Quantise w [N, K] to e4m3 per `block` x `block` block and back (DeepSeek's weight format)."""
    q, s = weight_quant(w, block)
    return weight_dequant(q, s, block, dtype=w.dtype)


def tensor_cores(x: torch.Tensor, n: int, k: int) -> bool:
    """Whether x's device runs the block-scaled FP8 GEMM for a [n, k] weight (else: emulated); logged once."""
    fast = x.device.type == "cuda" and shape_eligible(n, k) and fp8_gemm_supported(x.device)
    key = f"{x.device}:{fast}"
    if key not in _logged:
        _logged.add(key)
        log.info("FP8 training on %s: %s", x.device, "Fprop / Dgrad on the FP8 tensor cores (F.scaled_mm), Wgrad on "
                 "the same FP8 values in fp32" if fast else "emulated (FP8 values, fp32 products)")
    return fast


class Fp8LinearFn(torch.autograd.Function):
    """y = Q(x) Q(W)ᵀ; dx = Q(dy) Q(W); dW = Q(dy)ᵀ Q(x) (module docstring), products in fp32 (or on the
    FP8 tensor cores, `tensor_cores`). The output has the autocast dtype when autocast is on (as a BF16
    run's FP8 GEMMs write BF16), else x's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        ctx.dtypes = (x.dtype, w.dtype)
        ctx.fast = tensor_cores(x, *w.shape)
        if ctx.fast:
            q, s = weight_quant(w.detach().float())
            ctx.save_for_backward(qdq_tiles(x.detach().float()), q, s)
            return fp8_block_linear(x.detach(), q, s).to(out_dtype)
        xq, wq = qdq_tiles(x.float()), qdq_blocks(w.float())
        ctx.save_for_backward(xq, wq)
        with torch.autocast(dev, enabled=False):
            return F.linear(xq, wq).to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_dtype, w_dtype = ctx.dtypes
        if ctx.fast:
            xq, q, s = ctx.saved_tensors
            dq = qdq_tiles(dy.float())
            dx = None
            if ctx.needs_input_grad[0]:  # Q(dy) Q(W): W's transposed block grid has the same blocks and scales
                dx = fp8_block_linear(dy, q.t().contiguous(), s.t().contiguous()).to(x_dtype)
        else:
            xq, wq = ctx.saved_tensors
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


def fp8_swiglu(xs: torch.Tensor, counts: list[int], gate_w: torch.Tensor, up_w: torch.Tensor,
               down_w: torch.Tensor) -> torch.Tensor:
    """The routed experts' SwiGLU over sorted slices (`grouped_swiglu`'s contract) with each of the three
    projections on FP8 operands (`Fp8LinearFn`). Every expert's slice is taken, empty or not, so xs
    and every weight stay connected to the output (expert parallelism's backward all-to-all runs on
    every rank)."""
    out, start = [], 0
    for e, n in enumerate(counts):
        x = xs[start:start + n]
        h = F.silu(Fp8LinearFn.apply(x, gate_w[e])) * Fp8LinearFn.apply(x, up_w[e])
        out.append(Fp8LinearFn.apply(h, down_w[e]))
        start += n
    return torch.cat(out) if out else xs[:0]


class Fp8Experts(Experts):
    """`Experts` whose three projections run on FP8 operands (`fp8_swiglu`); same parameters and names."""

    swiglu = staticmethod(fp8_swiglu)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(Fp8LinearFn.apply(x, self.gate_proj[e])) * Fp8LinearFn.apply(x, self.up_proj[e])
        return Fp8LinearFn.apply(h, self.down_proj[e])

    def run_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return fp8_swiglu(xs, counts.tolist(), self.gate_proj, self.up_proj, self.down_proj)


def enable_fp8_training(model: nn.Module) -> int:
    """Replace every eligible `Linear` of `model` (not the `KEEP` ones) by an `Fp8Linear` holding the
    same weight Parameter, and every `Experts` by an `Fp8Experts` (in place: same Parameters); returns
    how many modules. Call before any parallel wrapping."""
    n = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is Experts:
            mod.__class__ = Fp8Experts
            n += 1
        elif type(mod) is nn.Linear and name.rsplit(".", 1)[-1] not in KEEP:
            new = Fp8Linear(mod.in_features, mod.out_features, bias=False, device="meta")
            new.weight = mod.weight
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, new)
            n += 1
    return n
