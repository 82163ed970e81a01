"""The quantised modules' native path (`dsv3.kernels.native`): each module's storage is packed for the
kernels once, on its first native call after loading (and again only if a buffer is replaced or written
in place: the cache is keyed by the buffers' storage pointers and version counters), never per call.

* int8 / w8a8: the stored int8 matrix as is, the per-channel scale as fp32 [N]; int8 and int4 run the
  kernels that take Q8 activations (`DECODE_FORMAT`: the activations quantised per 32-value block to
  int8 on each call, an integer dot per block), their exact-activation kernels stay as the reference;
* fp8: the e4m3 bytes as is, the 128x128 block scales x 256 (the kernel's fp16 decoding offset);
* int4: repacked IN PLACE from the CPU tinygemm layout to dsv3's, [N, K/32, 16] bytes (16 bytes hold 32
  consecutive values, low nibbles first) with the (scale, zero) pairs as [N, K/g, 2]; the 3-D shape
  marks the layout, which `Int4Weight` dequantises too, so no second copy is ever held;
* bf16: dense `nn.Linear`s kept dense by a quantisation (W8A8's lm_head, kv_b_proj) become
  `KernelLinear`, which reads a bf16 matrix at bf16 cost through the same GEMV.

Decode-sized calls (at most `MAX_ROWS` activation rows; `MAX_MOE_TOKENS` tokens for the fused MoE) go
native; larger ones (prefill) keep the schemes' torch GEMMs, except int4 once repacked (no torch kernel
reads dsv3's layout): its linears and experts then run the native GEMV at every size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.kernels import native as nk
from dsv3.quant.schemes import dsv3_int4_pack, unpack_int4

MAX_ROWS = nk.MAX_ROWS
eligible = nk.eligible  # CPU, no autograd, rows <= limit, the kernels loaded
MAX_MOE_TOKENS = 64
"""Most tokens one fused MoE call takes (decode batches); more go through the expert loop."""
INT4_ROW_BLOCK = 64  # rows per block of the tinygemm CPU layout
DECODE_FORMAT = {"int8": "int8_q8", "int4": "int4_q8"}
"""The native format each weight-only scheme runs (Q8 activations; `schemes.quantize_blocks_int8`)."""


@dataclass(frozen=True)
class Packed:
    fmt: str
    w: torch.Tensor
    s: torch.Tensor | None
    aux: torch.Tensor | None
    group: int = 0


def _key(*ts: torch.Tensor) -> tuple:
    # inference tensors keep no version counter (and are only written inside inference_mode, by loaders)
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.shape) for t in ts)


def cached_pack(module: nn.Module, q_name: str, s_name: str, pack_fn) -> Packed:
    """The module's packed form, recomputed only when its buffers change."""
    cache = module.__dict__.setdefault("_native_pack", {})
    key = _key(module._buffers[q_name], module._buffers[s_name])
    hit = cache.get(q_name)
    if hit is None or hit[0] != key:
        packed = pack_fn()
        key = _key(module._buffers[q_name], module._buffers[s_name])  # int4 repacks the buffers themselves
        cache[q_name] = (key, packed)
        return packed
    return hit[1]


def pack(scheme, q: torch.Tensor, s: torch.Tensor, lead: tuple[int, ...], n: int, k: int) -> Packed:
    """One matrix (lead = ()) or stacked experts (lead = (E,)) of `scheme`, each [n, k] -> the kernel's
    operands. Sizes are checked here: the C code trusts them."""
    m = 1
    for d in lead:
        m *= d
    if scheme.name in ("int8", "w8a8"):
        p = Packed(DECODE_FORMAT.get(scheme.name, scheme.name), q.contiguous(), s.float().reshape(*lead, -1).contiguous(), None)
        sizes = ((p.w, m * n * k), (p.s, m * n))
    elif scheme.name == "fp8":
        p = Packed("fp8", q.contiguous().view(torch.uint8), None, (s.float() * 256).contiguous())
        sizes = ((p.w, m * n * k), (p.aux, m * -(-n // 128) * -(-k // 128)))
    elif scheme.name == "int4":
        p = Packed(DECODE_FORMAT["int4"], q.contiguous(), s.to(torch.bfloat16).contiguous(), None, scheme.group)
        sizes = ((p.w, m * n * k // 2), (p.s, m * n * (k // scheme.group) * 2))
    else:
        raise ValueError(f"no native kernel for the {scheme.name} scheme")
    for t, want in sizes:
        if t.numel() != want:
            raise ValueError(f"{scheme.name} weight of [{n}, {k}] x {m}: a stored tensor has {t.numel()} values, expected {want}")
    return p


# ------------------------------------------------------------------------------------------- int4 layout
def tinygemm_to_dsv3(q: torch.Tensor, s: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One int4 matrix: CPU tinygemm packing [N, K/2] + scales_and_zeros [K/g, N, 2] -> dsv3's
    [N, K/32, 16] + [N, K/g, 2] (same values, same dtypes)."""
    if n % INT4_ROW_BLOCK == 0:  # each block of 64 rows: per k, 32 bytes = rows j (low nibble) and 32 + j (high)
        flat = q.reshape(n // INT4_ROW_BLOCK, k, 32)
        vals = torch.cat([flat & 0xF, flat >> 4], dim=2).permute(0, 2, 1).reshape(n, k)
    else:  # the packer's own layout, found by probing (slower; only for matrices off the 64-row block)
        vals = unpack_int4(q, n, k).to(torch.uint8)
    return dsv3_int4_pack(vals), s.transpose(0, 1).contiguous()


def repack_int4_(module: nn.Module, q_name: str, s_name: str, n: int, k: int) -> None:
    """Replace a module's int4 buffers (one matrix, or [E, ...] stacked experts) by dsv3's layout, once."""
    q, s = module._buffers[q_name], module._buffers[s_name]
    if q.dim() == (3 if q_name == "weight" else 4):
        return  # already dsv3's
    if q_name == "weight":
        module._buffers[q_name], module._buffers[s_name] = tinygemm_to_dsv3(q, s, n, k)
        return
    pairs = [tinygemm_to_dsv3(q[e], s[e], n, k) for e in range(q.shape[0])]
    module._buffers[q_name] = torch.stack([p for p, _ in pairs])
    module._buffers[s_name] = torch.stack([z for _, z in pairs])


# ------------------------------------------------------------------------------------------------ calls
def linear(module, x: torch.Tensor) -> torch.Tensor:
    """A QuantLinear's forward through the native GEMV."""
    scheme = module.scheme

    def make() -> Packed:
        if scheme.name == "int4":
            repack_int4_(module, "weight", "weight_scale_inv", module.out_features, module.in_features)
        return pack(scheme, module.weight, module.weight_scale_inv, (), module.out_features, module.in_features)

    p = cached_pack(module, "weight", "weight_scale_inv", make)
    return nk.gemv(p.fmt, x, p.w, p.s, p.aux, module.out_features, p.group).to(x.dtype)


PROJ = ("gate_proj", "up_proj", "down_proj")


def _expert_pack(module, p: str) -> Packed:
    scheme = module.scheme
    n, k = (module.dim, module.inter_dim) if p == "down_proj" else (module.inter_dim, module.dim)

    def make() -> Packed:
        if scheme.name == "int4":
            repack_int4_(module, p, p + "_scale_inv", n, k)
        return pack(scheme, module._buffers[p], module._buffers[p + "_scale_inv"], (module.n_experts,), n, k)

    return cached_pack(module, p, p + "_scale_inv", make)


def experts(module, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A QuantExperts' routed experts for every token in one native call (gate/up, SiLU, down, weighted sum)."""
    packs = [_expert_pack(module, p) for p in PROJ]
    f = packs[0]
    out = nk.moe(f.fmt, x, idx, w, [p.w for p in packs], [p.s for p in packs], [p.aux for p in packs],
                 module.inter_dim, f.group)
    return out.to(x.dtype)


def expert_linear(module, p: str, e: int, x: torch.Tensor) -> torch.Tensor:
    """One expert's projection `p` through the native GEMV (int4 experts in dsv3's layout, any row count)."""
    pk = _expert_pack(module, p)
    n = module.dim if p == "down_proj" else module.inter_dim
    return nk.gemv(pk.fmt, x, pk.w[e], None if pk.s is None else pk.s[e], None if pk.aux is None else pk.aux[e], n,
                   pk.group).to(x.dtype)


def any_rows(q: torch.Tensor, matrix_dims: int) -> bool:
    """Whether every call must go native whatever its size: int4 repacked to dsv3's layout (one more
    dimension than tinygemm's), which no torch kernel reads (the alternative is dequantising per call)."""
    return q.dim() == matrix_dims + 1


class KernelLinear(nn.Linear):
    """A dense `nn.Linear` kept dense by a quantisation: bf16 weights at decode batch sizes through the
    native bf16 GEMV (bf16 read at bf16 cost, widened to fp32 in registers), everything else `F.linear`.
    Same parameters and state-dict names as `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and self.weight.dtype == torch.bfloat16 and eligible(x, x.numel() // self.in_features, MAX_ROWS):
            return nk.gemv("bf16", x, self.weight.detach(), None, None, self.out_features).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def use_dense_kernels(model: nn.Module) -> int:
    """Turn the model's plain bias-free `nn.Linear`s into `KernelLinear`s (same object, same tensors)."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.bias is None:
            m.__class__ = KernelLinear
            n += 1
    return n
