"""Drop-in quantised modules: `QuantLinear` for `nn.Linear`, `QuantExperts` for the stacked routed experts.

Both hold their weights as buffers named like the checkpoint tensors (`weight` + `weight_scale_inv`;
for experts `gate_proj` + `gate_proj_scale_inv`, ...), so the streaming loader fills them directly.
Casting the model (`model.to(torch.bfloat16)`) never touches the quantised storage, and FP8 scales
stay fp32. `reference = True` on a module switches it to its scheme's plain dequantise-then-matmul path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.moe import Experts
from dsv3.quant import native
from dsv3.quant.schemes import Scheme


def _keep_storage(module: nn.Module, fn, recurse: bool, names: tuple[str, ...]):
    """Apply `fn` (device/dtype cast) but keep the dtype of the named buffers (device moves still apply)."""
    before = {n: module._buffers[n] for n in names if module._buffers.get(n) is not None}
    out = nn.Module._apply(module, fn, recurse)
    for n, old in before.items():
        new = module._buffers[n]
        if new.dtype != old.dtype:
            module._buffers[n] = old.to(device=new.device)
    return out


class QuantLinear(nn.Module):
    """y = x Wᵀ with W stored quantised by `scheme` (no bias: DeepSeek's linears have none)."""

    def __init__(self, scheme: Scheme, q: torch.Tensor, s: torch.Tensor, in_features: int, out_features: int):
        super().__init__()
        self.scheme = scheme
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale_inv", s)
        self.reference = False

    @classmethod
    def from_linear(cls, scheme: Scheme, lin: nn.Linear) -> "QuantLinear":
        if lin.bias is not None:
            raise ValueError("QuantLinear has no bias")
        q, s = scheme.quantize(lin.weight.detach())
        return cls(scheme, q, s if scheme.keep_scale_fp32 else s.to(lin.weight.dtype), lin.in_features, lin.out_features)

    @classmethod
    def empty(cls, scheme: Scheme, in_features: int, out_features: int, device="meta", dtype=torch.float32) -> "QuantLinear":
        q, s = scheme.empty(out_features, in_features, device, dtype)
        return cls(scheme, q, s, in_features, out_features)

    def _apply(self, fn, recurse=True):
        return _keep_storage(self, fn, recurse, ("weight", "weight_scale_inv") if self.scheme.keep_scale_fp32 else ("weight",))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [out, in] matrix (for the absorbed-MLA weights and tests)."""
        return self.scheme.dequantize(self.weight, self.weight_scale_inv, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if not self.reference and native.eligible(x, 0 if native.any_rows(self.weight, 2) else rows, native.MAX_ROWS):
            return native.linear(self, x)
        f = self.scheme.linear_reference if self.reference else self.scheme.linear
        return f(x, self.weight, self.weight_scale_inv, self.in_features)

    def extra_repr(self) -> str:
        return f"{self.scheme.name}, in_features={self.in_features}, out_features={self.out_features}"


PROJ = ("gate_proj", "up_proj", "down_proj")


class QuantExperts(Experts):
    """Routed experts with each stacked matrix stored quantised: `gate_proj` [E, ...] + `gate_proj_scale_inv`.

    Inherits `forward_loop` / `forward_grouped` (the model's routing maths); only `expert(e, x)` changes,
    and `forward_grouped` runs a decode batch's routed experts in one fused native call when it can
    (`dsv3.quant.native.experts`; `forward_loop` stays the readable reference).
    """

    def __init__(self, scheme: Scheme, n_experts: int, dim: int, inter_dim: int, tensors: dict[str, torch.Tensor]):
        nn.Module.__init__(self)
        self.scheme = scheme
        self.n_experts, self.dim, self.inter_dim = n_experts, dim, inter_dim
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.reference = False

    @classmethod
    def from_experts(cls, scheme: Scheme, ex: Experts) -> "QuantExperts":
        E, inter, dim = ex.gate_proj.shape
        tensors = {}
        for p in PROJ:
            w = getattr(ex, p).detach()
            pairs = [scheme.quantize(w[e]) for e in range(E)]
            tensors[p] = torch.stack([q for q, _ in pairs])
            s = torch.stack([s for _, s in pairs])
            tensors[p + "_scale_inv"] = s if scheme.keep_scale_fp32 else s.to(w.dtype)
            setattr(ex, p, None)  # free the dense matrix as soon as it is quantised
        return cls(scheme, E, dim, inter, tensors)

    @classmethod
    def empty(cls, scheme: Scheme, n_experts: int, dim: int, inter_dim: int, device="meta", dtype=torch.float32) -> "QuantExperts":
        tensors = {}
        for p, (n, k) in zip(PROJ, ((inter_dim, dim), (inter_dim, dim), (dim, inter_dim))):
            q, s = scheme.empty(n, k, device, dtype)
            tensors[p] = q.expand(n_experts, *q.shape).contiguous() if device != "meta" else q.expand(n_experts, *q.shape)
            tensors[p + "_scale_inv"] = s.expand(n_experts, *s.shape)
        return cls(scheme, n_experts, dim, inter_dim, tensors)

    def _apply(self, fn, recurse=True):
        keep = PROJ + (tuple(p + "_scale_inv" for p in PROJ) if self.scheme.keep_scale_fp32 else ())
        return _keep_storage(self, fn, recurse, keep)

    def _lin(self, p: str, e: int, x: torch.Tensor) -> torch.Tensor:
        if not self.reference and native.any_rows(self._buffers[p], 3) and native.eligible(x, 0, 0):
            return native.expert_linear(self, p, e, x)
        k = self.inter_dim if p == "down_proj" else self.dim
        q, s = getattr(self, p)[e], getattr(self, p + "_scale_inv")[e]
        if self.reference:  # Q8 activations where the fused native MoE would have run (or int4's any-size GEMV)
            q8 = native.eligible(x, 0 if native.any_rows(self._buffers[p], 3) else x.shape[0], native.MAX_MOE_TOKENS)
            return self.scheme.linear_reference(x, q, s, k, q8=q8)
        return self.scheme.linear(x, q, s, k)

    def forward_grouped(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if not self.reference and native.eligible(x, x.shape[0], native.MAX_MOE_TOKENS):
            return native.experts(self, x, w, idx)
        return super().forward_grouped(x, w, idx)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self._lin("down_proj", e, F.silu(self._lin("gate_proj", e, x)) * self._lin("up_proj", e, x))

    def extra_repr(self) -> str:
        return f"{self.scheme.name}, experts={self.n_experts}, dim={self.dim}, inter_dim={self.inter_dim}"


def quant_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the quantised modules' buffers, weights they hold) — the resident cost per weight."""
    nbytes = nweights = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            nweights += m.in_features * m.out_features
        elif isinstance(m, QuantExperts):
            nweights += 3 * m.n_experts * m.dim * m.inter_dim
        else:
            continue
        nbytes += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
    return nbytes, nweights
