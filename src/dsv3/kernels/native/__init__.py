"""dsv3's native CPU kernels: the loader, the ISA choice and the two calls (`gemv`, `moe`).

The kernels are a plain C shared object (`_kernels*.so`, built by setup.py when the package is
installed; sources beside this file) called through ctypes, which releases the GIL, with tensor data
pointers. Each call is registered as a `torch.library` op (`dsv3_native::gemv`, `dsv3_native::moe`) so
profiles name it. The .so picks the best ISA the CPU has at run time (AVX2+FMA, AVX-512 F/BW/VL,
AVX-512-VNNI; the table leaves a slot for AMX); `DSV3_ISA=none|avx2|avx512|avx512_vnni` caps it, `none`
meaning today's torch paths. Threads: `torch.get_num_threads()` on every call, run on torch's own
OpenMP pool (its `GOMP_parallel`), so `torch.set_num_threads` governs them.

When the .so is missing (no compiler at install), or the CPU lacks AVX2+FMA, or DSV3_ISA=none, the
quantised modules run today's torch paths and one line says so (logged once). `DSV3_KERNELS_LIB`
names another .so to load (tests point it at a missing file to check that fallback).

Formats (layouts are the quantisation schemes' packed forms, `dsv3.quant.schemes.*.pack`):
int8 / w8a8: int8 [N, K] + fp32 scale [N]; fp8: e4m3 bytes [N, K] + fp32 block scales x 256;
int4: [N, K/2] bytes, per 32 values 16 bytes (low nibbles first) + bf16 (scale, zero) [N, K/g, 2];
bf16 / f32: the matrix itself (f32: a dense fp32 model's routed experts, `dsv3.kernels.grouped`);
int8_q8 / int4_q8: the int8 / int4 layouts on Q8 activations (quantised per 32-value block per call).
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv3.errors import UserError

ISAS = ("none", "avx2", "avx512", "avx512_vnni", "amx")  # index = the .so's ISA code
FORMATS = ("int8", "w8a8", "fp8", "int4", "bf16", "int8_q8", "int4_q8", "f32")  # index = the .so's format code
BYTES_X2 = {"int8": 2, "w8a8": 2, "fp8": 2, "int4": 1, "bf16": 4, "int8_q8": 2, "int4_q8": 1, "f32": 8}  # twice the bytes per weight
ERRORS = {-1: "no kernel for this CPU's ISA", -2: "bad argument", -3: "out of memory"}
MAX_ROWS = 16
"""Most activation rows the quantised modules send to the native GEMV (decode batches); more rows
(prefill) use torch's GEMMs. The kernel itself takes any number of rows."""
log = logging.getLogger("dsv3.kernels")


@dataclass(frozen=True)
class Native:
    lib: ctypes.CDLL | None
    isa: str  # the ISA the kernels run ("none": torch paths)
    detected: str  # the best the CPU has with a kernel
    threads: str  # how threads are run
    note: str  # why the torch paths run (empty when the kernels do)


_state: Native | None = None


def _find_lib() -> Path | None:
    env = os.environ.get("DSV3_KERNELS_LIB")
    if env:
        return Path(env) if Path(env).is_file() else None
    found = sorted(Path(__file__).parent.glob("_kernels*.so"))
    return found[0] if found else None


def _bind(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.dsv3_isa_detected.restype = i
    lib.dsv3_last_team.restype = i
    lib.dsv3_set_isa.argtypes, lib.dsv3_set_isa.restype = [i], i
    lib.dsv3_set_omp.argtypes, lib.dsv3_set_omp.restype = [p, p, p], None
    lib.dsv3_gemv.argtypes = [i, p, i, i, p, p, p, p, i, i, i]
    lib.dsv3_gemv.restype = i
    lib.dsv3_moe.argtypes = [i, p, i, i, i, i, p, p, i, p, p, p, i, p, i]
    lib.dsv3_moe.restype = i


def _omp(lib: ctypes.CDLL) -> str:
    """Hand torch's OpenMP entry points (already loaded with torch) to the kernels."""
    here = ctypes.CDLL(None)
    try:
        fns = [ctypes.cast(getattr(here, n), ctypes.c_void_p) for n in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")]
    except AttributeError:
        return "1 (torch's OpenMP runtime not found: the kernels run on the calling thread)"
    lib.dsv3_set_omp(*fns)
    return "torch's OpenMP pool (torch.set_num_threads)"


def load() -> Native:
    """Load the kernels once (first use); later calls return the same state."""
    global _state
    if _state is not None:
        return _state
    want = os.environ.get("DSV3_ISA", "").strip().lower()
    if want and want not in ISAS[:4]:
        raise UserError(f"DSV3_ISA={want!r}: expected one of {', '.join(ISAS[:4])}")
    path = _find_lib()
    if path is None:
        _state = Native(None, "none", "unknown", "-", "dsv3 native kernels not built (no C compiler at install?): using torch's kernels")
    else:
        lib = ctypes.CDLL(str(path))
        _bind(lib)
        detected = ISAS[lib.dsv3_isa_detected()]
        isa = ISAS[lib.dsv3_set_isa(ISAS.index(want) if want else len(ISAS))]
        note = ("" if isa != "none" else
                "DSV3_ISA=none: using torch's kernels" if want == "none" else
                "this CPU lacks AVX2+FMA, the native kernels' floor: using torch's kernels")
        _state = Native(lib if isa != "none" else None, isa, detected, _omp(lib) if isa != "none" else "-", note)
    if _state.note:
        log.warning("dsv3.kernels: %s", _state.note)
    return _state


def available() -> bool:
    return load().lib is not None


def eligible(x: torch.Tensor, rows: int, limit: int) -> bool:
    """Whether a call goes native: CPU, no autograd, a decode-sized batch (rows <= limit), the kernels loaded."""
    return (x.device.type == "cpu" and rows <= limit and not (torch.is_grad_enabled() and x.requires_grad)
            and available())


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None and t.numel() else None


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"dsv3 native {what}: {ERRORS.get(rc, rc)}")


def _gemv_impl(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, aux: torch.Tensor, fmt: int, n: int, group: int) -> torch.Tensor:
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.float32)
    rc = load().lib.dsv3_gemv(fmt, _ptr(x), m, k, _ptr(w), _ptr(s), _ptr(aux), _ptr(y), n, group, torch.get_num_threads())
    _check(rc, f"{FORMATS[fmt]} gemv")
    return y


def _moe_impl(x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, w: list[torch.Tensor], s: list[torch.Tensor],
              aux: list[torch.Tensor], fmt: int, inter: int, group: int) -> torch.Tensor:
    t, d = x.shape
    out = torch.empty(t, d, dtype=torch.float32)
    arr = ctypes.c_void_p * 3
    e = w[0].shape[0]
    rc = load().lib.dsv3_moe(fmt, _ptr(x), t, d, inter, idx.shape[1], _ptr(idx), _ptr(wts), e, arr(*map(_ptr, w)),
                             arr(*map(_ptr, s)), arr(*map(_ptr, aux)), group, _ptr(out), torch.get_num_threads())
    _check(rc, f"{FORMATS[fmt]} moe")
    return out


_LIB = torch.library.Library("dsv3_native", "DEF")
_LIB.define("gemv(Tensor x, Tensor w, Tensor s, Tensor aux, int fmt, int n, int group) -> Tensor")
_LIB.define("moe(Tensor x, Tensor idx, Tensor wts, Tensor[] w, Tensor[] s, Tensor[] aux, int fmt, int inter, int group) -> Tensor")
_LIB.impl("gemv", _gemv_impl, "CPU")
_LIB.impl("moe", _moe_impl, "CPU")
_EMPTY = torch.empty(0)


def gemv(fmt: str, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, aux: torch.Tensor | None, n: int,
         group: int = 0) -> torch.Tensor:
    """x [..., K] (any float dtype) @ the packed weight [n, K] -> fp32 [..., n]."""
    k = x.shape[-1]
    if not w.is_contiguous() or w.numel() * w.element_size() * 2 != n * k * BYTES_X2[fmt]:
        raise ValueError(f"{fmt} gemv: weight of {w.numel() * w.element_size()} bytes"
                         f"{'' if w.is_contiguous() else ' (not contiguous)'} for [{n}, {k}]")
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    y = torch.ops.dsv3_native.gemv(x2, w, _EMPTY if s is None else s, _EMPTY if aux is None else aux, FORMATS.index(fmt), n, group)
    return y.view(*x.shape[:-1], n)


def moe(fmt: str, x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, w: list[torch.Tensor], s: list, aux: list,
        inter: int, group: int = 0) -> torch.Tensor:
    """The routed experts of every token in one call: x [T, D], idx / wts [T, k] -> fp32 [T, D].
    w: gate [E, I, D], up [E, I, D], down [E, D, I] packed; s / aux: their scales (None where unused)."""
    fix = [t if t is not None else _EMPTY for t in (*s, *aux)]
    return torch.ops.dsv3_native.moe(x.to(torch.float32).contiguous(), idx.to(torch.int64).contiguous(),
                                     wts.to(torch.float32).contiguous(), list(w), fix[:3], fix[3:], FORMATS.index(fmt), inter, group)


def describe() -> list[str]:
    """The lines `dsv3 info` prints: the kernel path per format on this machine."""
    st = load()
    if st.lib is None:
        return [f"kernels: torch paths for every format ({st.note})"]
    return [f"kernels: dsv3 native, ISA {st.isa} (CPU best: {st.detected}), threads: {st.threads}",
            f"kernels per format: int8, w8a8 ({'vpdpbusd' if st.isa == 'avx512_vnni' else 'maddubs'}), fp8 (e4m3 read "
            f"at 1 byte), int4, bf16 dense: native GEMV up to {MAX_ROWS} rows, torch GEMMs above; "
            "int8 / int4 on Q8 activations (int8 per 32-value block); "
            "routed experts (quantised, or fp32 at decode): one fused native call per MoE layer"]


def last_team() -> int:
    """Threads that ran the latest native call (tests: torch.set_num_threads governs them)."""
    return load().lib.dsv3_last_team()


def set_isa(name: str) -> str:
    """Re-dispatch the loaded kernels to at most ISA `name` (tests run every path the CPU has);
    returns the ISA now used."""
    st = load()
    if st.lib is None:
        raise RuntimeError(f"dsv3 native kernels not in use ({st.note})")
    return ISAS[st.lib.dsv3_set_isa(ISAS.index(name))]

