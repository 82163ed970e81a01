"""Quantisation schemes: how a weight W [N,K] (out, in) is stored, dequantised and multiplied.

Every scheme stores a weight as two tensors, named like DeepSeek's FP8 checkpoints:
`weight` (the quantised storage) and `weight_scale_inv` (the float multiplier that dequantises it),
and has two matmul paths kept side by side (`style.md` §9 rule 6):

* `linear(x, q, s)`: the fast path (VNNI int8 GEMM, packed int4 kernel, chunked FP8 dequantisation);
* `linear_reference(x, q, s)`: the plain one, `F.linear(x, dequantize(q, s))`.

Schemes:
* `int8`  weight-only, per output channel (symmetric, s [N,1]); `torch._weight_int8pack_mm` on CPU.
* `w8a8`  the seed's W8A8: int8 weights per output channel, int8 activations per token (dynamic,
  symmetric), int8 x int8 -> int32 GEMM with `torch._int_mm`, rescaled by a_scale[M,1]·w_scale[1,N].
* `int4`  weight-only, group-wise asymmetric along K (gpt-fast / torchao: w = (q - 8)·scale + zero),
  storage in the CPU tinygemm layout of `torch._convert_weight_to_int4pack_for_cpu` (0.5 B/weight),
  s = scales_and_zeros [K/group, N, 2]; `torch._weight_int4pack_mm_for_cpu`. The native kernels
  repack it once to dsv3's layout (q [N, K/32, 16], s [N, K/g, 2]), which `dequantize` reads too.

The quantised modules send decode-sized calls to `dsv3.kernels.native` (`dsv3.quant.native` packs each
weight once); `linear` here is the torch path they fall back to. The native int8 / int4 kernels take
Q8 activations (`quantize_blocks_int8`: int8 per 32-value block, as llama.cpp's Q8_0), so where they run
the references quantise the activations the same way (`linear_reference`).
* `fp8`   DeepSeek's float8_e4m3fn with 128x128 block scales (s [ceil(N/128), ceil(K/128)]): on
  Hopper-class CUDA a block-scaled FP8 GEMM with per-token FP8 activations (`dsv3.quant.fp8_gemm`),
  elsewhere dequantising a chunk of 128-row blocks at a time (never the whole matrix).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dsv3.checkpoint.fp8 import BLOCK, weight_dequant, weight_quant
from dsv3.quant.fp8_gemm import fp8_block_linear, fp8_gemm_supported, shape_eligible

INT8_MAX = 127.0
KERNEL_ROWS = 16
"""Most activation rows the weight-only int8 kernel takes (decode batches); more rows use a dense matmul."""
FP8_CHUNK_ROWS = 1024
"""Output rows dequantised at once by the FP8 fast path (a multiple of 128)."""


class Scheme:
    """Base: subclasses define storage (`empty`, `quantize`, `dequantize`) and the fast `linear`."""

    name = ""
    keep_scale_fp32 = False  # the scale stays fp32 whatever dtype the model is cast to

    def supports(self, n: int, k: int) -> bool:
        """Whether a [n, k] weight can use this scheme (else the layer stays unquantised)."""
        return True

    def empty(self, n: int, k: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def dequantize(self, q: torch.Tensor, s: torch.Tensor, k: int) -> torch.Tensor:
        """-> fp32 [N, K]."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, k: int) -> torch.Tensor:
        raise NotImplementedError

    def linear_reference(self, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, k: int, q8: bool | None = None) -> torch.Tensor:
        """q8: whether the fast path took Q8 activations (int8 / int4; None: decided from x as the modules do)."""
        return F.linear(x, self.dequantize(q, s, k).to(x.dtype))


QUANT_CHUNK_ROWS = 4096
"""Rows quantised at a time: the fp32 temporaries of quantising a matrix stay a chunk's (the 129k-row
head would otherwise take several times its own fp32 size while loading)."""


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: w [N,K] -> (q int8 [N,K], s fp32 [N,1]) with w ≈ q·s."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    s = torch.empty(*w.shape[:-1], 1, dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], QUANT_CHUNK_ROWS):
        c = w[r : r + QUANT_CHUNK_ROWS].float()
        sc = c.abs().amax(-1, keepdim=True).clamp(min=1e-12) / INT8_MAX
        q[r : r + QUANT_CHUNK_ROWS] = (c / sc).round_().clamp_(-INT8_MAX, INT8_MAX)
        s[r : r + QUANT_CHUNK_ROWS] = sc
    return q, s


ACT_BLOCK = 32
"""Activation values per int8 block in the native int8 / int4 kernels (dsv3_kernels.c's QB)."""


def quantize_blocks_int8(x: torch.Tensor) -> torch.Tensor:
    """Q8 activations as the native int8 / int4 kernels take them, dequantised: x [..., K] (fp32) per block
    of ACT_BLOCK values -> s·round(x / s), s = max(amax, 1e-12) / 127; values past the last whole block
    stay exact (the kernels' fp32 tail)."""
    k = x.shape[-1]
    full = k - k % ACT_BLOCK
    xb = x[..., :full].reshape(*x.shape[:-1], full // ACT_BLOCK, ACT_BLOCK)
    s = xb.abs().amax(-1, keepdim=True).clamp(min=1e-12) / INT8_MAX
    q = (xb / s).round().clamp(-INT8_MAX, INT8_MAX) * s
    return torch.cat([q.reshape(*x.shape[:-1], full), x[..., full:]], dim=-1)


def _native_q8(x: torch.Tensor, k: int, any_rows: bool = False) -> bool:
    """Whether the quantised modules would send this call to the native Q8-activation kernels."""
    from dsv3.kernels import native as nk

    return nk.eligible(x, 0 if any_rows else x.numel() // k, nk.MAX_ROWS)


class Int8Weight(Scheme):
    name = "int8"

    def empty(self, n, k, device, dtype=torch.float32):
        return torch.empty(n, k, dtype=torch.int8, device=device), torch.empty(n, 1, dtype=dtype, device=device)

    def quantize(self, w):
        return quantize_rows_int8(w)

    def dequantize(self, q, s, k):
        return q.float() * s.float()

    def linear(self, x, q, s, k):
        """CPU, up to KERNEL_ROWS rows (decode): `_weight_int8pack_mm` on bf16 activations (its fast
        kernel; with fp32 activations it measured ~7x slower than an fp32 GEMV). Otherwise the int8
        matrix is converted to x's dtype and the per-channel scale applied after the matmul."""
        rows = x.numel() // k
        if x.device.type == "cpu" and rows <= KERNEL_ROWS:
            y = torch._weight_int8pack_mm(x.reshape(-1, k).to(torch.bfloat16), q, s.view(-1).to(torch.bfloat16))
            return y.to(x.dtype).view(*x.shape[:-1], -1)
        return F.linear(x, q.to(x.dtype)) * s.view(-1).to(x.dtype)

    def linear_reference(self, x, q, s, k, q8=None):
        """Dequantise, then F.linear; activations as the kernel that runs takes them: Q8 blocks (native
        kernels), rounded to bf16 (torch's `_weight_int8pack_mm`, decode rows) or exact."""
        if _native_q8(x, k) if q8 is None else q8:
            return F.linear(quantize_blocks_int8(x.float()), self.dequantize(q, s, k)).to(x.dtype)
        if x.device.type == "cpu" and x.numel() // k <= KERNEL_ROWS:
            return F.linear(x.to(torch.bfloat16).float(), self.dequantize(q, s, k)).to(x.dtype)
        return F.linear(x, self.dequantize(q, s, k).to(x.dtype))


def quantize_tokens_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token activation quantisation: x [M,K] -> (int8 [M,K], fp32 scale [M,1])."""
    return quantize_rows_int8(x)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 a [M,K] @ int8 b [K,N] -> int32 [M,N] via `torch._int_mm` (VNNI on CPU, IMMA on CUDA).

    CUDA's kernel needs M > 16 and K, N multiples of 8: M is zero-padded (the extra rows are
    dropped); K or N off the multiple use the integer reference (exact, slower), explicitly.
    """
    if a.device.type != "cuda":
        return torch._int_mm(a, b)
    M, K = a.shape
    N = b.shape[1]
    if K % 8 or N % 8:
        return int_mm_reference(a, b)
    if M <= 16:
        return torch._int_mm(F.pad(a, (0, 0, 0, 17 - M)), b)[:M]
    return torch._int_mm(a, b)


def int_mm_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer product through int64 (no special kernel)."""
    return (a.long() @ b.long()).to(torch.int32) if a.device.type == "cpu" else (a.double() @ b.double()).to(torch.int32)


class W8A8(Int8Weight):
    name = "w8a8"

    def linear(self, x, q, s, k):
        xq, xs = quantize_tokens_int8(x.reshape(-1, k))
        acc = int_mm(xq, q.t())  # [M,N] int32
        y = acc.float() * xs * s.view(1, -1).float()
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    def linear_reference(self, x, q, s, k, q8=None):
        """Dequantise both operands (per-token activations, per-channel weights), then F.linear in fp32."""
        xq, xs = quantize_tokens_int8(x.reshape(-1, k))
        y = F.linear(xq.float() * xs, self.dequantize(q, s, k))
        return y.to(x.dtype).view(*x.shape[:-1], -1)


class Int4Weight(Scheme):
    """Group-wise asymmetric int4 in the CPU tinygemm layout (N % 16 == 0, K % group == 0)."""

    def __init__(self, group_size: int = 32):
        if group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4 group size must be 32, 64, 128 or 256, got {group_size}")
        self.group = group_size
        self.name = "int4"

    def supports(self, n, k):
        return n % 16 == 0 and k % self.group == 0

    def empty(self, n, k, device, dtype=torch.float32):
        return (torch.empty(n, k // 2, dtype=torch.uint8, device=device),
                torch.empty(k // self.group, n, 2, dtype=dtype, device=device))

    def quantize(self, w):
        """Row chunks of QUANT_CHUNK_ROWS (a multiple of the packer's 64-row blocks) when N is whole blocks."""
        n = w.shape[0]
        if n <= QUANT_CHUNK_ROWS or n % 64:
            return self._quantize(w)
        parts = [self._quantize(w[r : r + QUANT_CHUNK_ROWS]) for r in range(0, n, QUANT_CHUNK_ROWS)]
        return torch.cat([p for p, _ in parts]), torch.cat([z for _, z in parts], dim=1)

    def _quantize(self, w):
        n, k = w.shape
        g = w.float().reshape(n, k // self.group, self.group)
        lo, hi = g.amin(-1), g.amax(-1)  # [N, K/g]
        scale = (hi - lo).clamp(min=1e-6) / 15
        zero = lo + scale * 8  # w = (q - 8)·scale + zero = q·scale + lo
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        return packed, torch.stack([scale.t(), zero.t()], dim=-1).contiguous()

    def dequantize(self, q, s, k):
        n = q.shape[0]
        if q.dim() == 3:  # dsv3's native layout [N, K/32, 16] with s [N, K/g, 2] (`dsv3.quant.native`)
            vals, s = dsv3_int4_unpack(q).float(), s.transpose(0, 1)
        else:
            vals = unpack_int4(q, n, k).float()  # [N,K] in 0..15
        scale = s[..., 0].t().float().repeat_interleave(self.group, dim=1)
        zero = s[..., 1].t().float().repeat_interleave(self.group, dim=1)
        return (vals - 8) * scale + zero

    def linear(self, x, q, s, k):
        """`_weight_int4pack_mm_for_cpu` on bf16 activations (its AVX-512 kernel takes bf16; fp32
        activations measured ~16x slower). CUDA: the reference (the tinygemm CPU layout has no CUDA kernel here)."""
        if x.device.type != "cpu" or q.dim() == 3:  # or repacked for the native kernels: no torch kernel takes it
            return self.linear_reference(x, q, s, k)
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, k).to(torch.bfloat16), q, self.group, s.to(torch.bfloat16))
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    def linear_reference(self, x, q, s, k, q8=None):
        """Dequantise, then F.linear; on CPU the scales are rounded to bf16 as the kernels' are, and the
        activations as the kernel that runs takes them (Q8 blocks native, bf16 torch's)."""
        if x.device.type != "cpu":
            return F.linear(x, self.dequantize(q, s, k).to(x.dtype))
        w = self.dequantize(q, s.to(torch.bfloat16), k)
        xa = quantize_blocks_int8(x.float()) if (_native_q8(x, k, q.dim() == 3) if q8 is None else q8) else x.to(torch.bfloat16).float()
        return F.linear(xa, w).to(x.dtype)


@functools.lru_cache(maxsize=64)
def _int4_layout(n: int, k: int) -> torch.Tensor:
    """For the packed [N, K/2] uint8 layout: the flat index (n·K + k) stored in each nibble, as [N·K]
    ordered (byte, low nibble first). Found by packing index-coded probes through the packer itself."""
    idx = torch.arange(n * k, dtype=torch.int64)
    out = torch.zeros(n * k, dtype=torch.int64)
    shift = 0
    while (1 << shift) < n * k:
        probe = ((idx >> shift) & 0xF).to(torch.int32).view(n, k)
        p = torch._convert_weight_to_int4pack_for_cpu(probe, 1).flatten()
        nib = torch.stack([p & 0xF, p >> 4], dim=-1).flatten().long()
        out |= nib << shift
        shift += 4
    return out


def dsv3_int4_pack(vals: torch.Tensor) -> torch.Tensor:
    """int4 values [N, K] (0..15) -> [N, K/32, 16] bytes: byte j of a 32-block holds values j | (16 + j) << 4."""
    n, k = vals.shape
    v = vals.to(torch.uint8).view(n, k // 32, 2, 16)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).contiguous()


def dsv3_int4_unpack(q: torch.Tensor) -> torch.Tensor:
    """[N, K/32, 16] bytes -> the int4 values [N, K] (uint8, 0..15)."""
    n = q.shape[0]
    return torch.stack([q & 0xF, q >> 4], dim=2).reshape(n, -1)


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Packed [N, K/2] -> the int4 values [N, K] (int64, 0..15), inverse of the CPU packer."""
    flat = packed.cpu().flatten()
    nib = torch.stack([flat & 0xF, flat >> 4], dim=-1).flatten().long()
    vals = torch.empty(n * k, dtype=torch.int64)
    vals[_int4_layout(n, k)] = nib
    return vals.view(n, k).to(packed.device)


class Fp8Block(Scheme):
    name = "fp8"
    keep_scale_fp32 = True

    def empty(self, n, k, device, dtype=torch.float32):
        return (torch.empty(n, k, dtype=torch.float8_e4m3fn, device=device),
                torch.empty(-(-n // BLOCK), -(-k // BLOCK), dtype=torch.float32, device=device))

    def quantize(self, w):
        return weight_quant(w)

    def dequantize(self, q, s, k):
        return weight_dequant(q, s, dtype=torch.float32)

    def linear(self, x, q, s, k):
        """CUDA (Hopper-class): block-scaled FP8 GEMM (`dsv3.quant.fp8_gemm`). Elsewhere dequantise
        FP8_CHUNK_ROWS output rows at a time into x's dtype and multiply: the largest dense copy held
        is one chunk, never the whole matrix."""
        n = q.shape[0]
        if x.is_cuda and shape_eligible(n, k) and fp8_gemm_supported(x.device):
            return fp8_block_linear(x, q, s)
        if n <= FP8_CHUNK_ROWS:
            return F.linear(x, weight_dequant(q, s, dtype=x.dtype))
        rb = FP8_CHUNK_ROWS // BLOCK
        outs = [F.linear(x, weight_dequant(q[r : r + FP8_CHUNK_ROWS], s[r // BLOCK : r // BLOCK + rb], dtype=x.dtype))
                for r in range(0, n, FP8_CHUNK_ROWS)]
        return torch.cat(outs, dim=-1)

    def linear_reference(self, x, q, s, k, q8=None):
        return F.linear(x, weight_dequant(q, s, dtype=torch.float32).to(x.dtype))


SCHEMES = ("w8a8", "int8", "int4", "fp8")


def make_scheme(name: str, group_size: int = 32) -> Scheme:
    if name == "w8a8":
        return W8A8()
    if name == "int8":
        return Int8Weight()
    if name == "int4":
        return Int4Weight(group_size)
    if name == "fp8":
        return Fp8Block()
    raise ValueError(f"quantization must be one of {', '.join(SCHEMES)} (or none), got {name!r}")
