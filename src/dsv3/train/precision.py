"""The precision a training run computes in: `train.precision` on a device that runs it at speed.

`train.precision: bf16` (the seed YAML's `compute_dtype: bfloat16`) is bf16 autocast over fp32 master
weights, gradients and AdamW state. A CPU without bf16 instructions (no `avx512_bf16` / `amx_bf16` flag,
e.g. an AVX2 machine) emulates every bf16 GEMM: autocast ran 5-20x slower than fp32 there (issue 26: the
hidden-512 1B run finished no step in 16 minutes). On such a CPU `train.cpu_bf16: auto` (the default)
turns autocast off: the run computes in fp32 with the same fp32 weights, gradients and optimizer state,
so it trains at fp32 speed, and says so in one line with the slowdown measured there at startup (one
small GEMM in bf16 and in fp32). `train.cpu_bf16: autocast` keeps bf16 autocast anyway (its numerics).

Native bf16 is read from /proc/cpuinfo (x86 `flags`, Arm `Features`: `bf16`). `$DSV3_ISA` (none, avx2,
avx512, avx512_vnni: the ISA cap the native kernels honour) caps it too: any value means "no native
bf16", so a machine that has it can run the fallback (tests). Without /proc/cpuinfo the measured
slowdown decides (more than `SLOW` times fp32: fallback).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ISA_ENV = "DSV3_ISA"
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
SLOW = 1.5
"""bf16/fp32 GEMM time ratio above which a CPU whose flags are unknown counts as emulating bf16."""
GEMM = 512
"""Side of the square GEMM timed at startup (0.27 GFLOP: milliseconds in fp32)."""


@dataclass(frozen=True)
class Precision:
    """What a run computes in: `runs` ("bf16" autocast or "fp32"), and the line that says why when it differs
    from `train.precision` (None otherwise)."""

    requested: str
    runs: str
    note: str | None = None


def cpu_bf16_support(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[bool | None, str]:
    """(native bf16?, why): False when $DSV3_ISA caps the ISA or the CPU flags lack bf16; None when unknown."""
    cap = os.environ.get(ISA_ENV, "").strip()
    if cap:
        return False, f"{ISA_ENV}={cap} caps the ISA below bf16"
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, f"{cpuinfo} unreadable"
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags:
        return None, f"no CPU flags in {cpuinfo}"
    have = [f for f in BF16_FLAGS if f in flags]
    return (True, f"CPU flags {', '.join(have)}") if have else (False, f"no {' / '.join(BF16_FLAGS[:2])} in the CPU flags")


def bf16_slowdown(n: int = GEMM, reps: int = 3) -> float:
    """Time of an n x n x n bf16 GEMM over the fp32 one on this CPU (best of `reps` each, after a warm-up)."""

    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)


def resolve(requested: str, device: torch.device, cpu_bf16: str = "auto") -> Precision:
    """The precision a run with `train.precision` = `requested` computes in on `device` (see the module docstring)."""
    if requested != "bf16" or device.type != "cpu" or cpu_bf16 == "autocast":
        return Precision(requested, requested)
    native, why = cpu_bf16_support()
    if native:
        return Precision(requested, "bf16")
    ratio = bf16_slowdown()
    if native is None and ratio <= SLOW:
        return Precision(requested, "bf16")
    note = (f"train.precision bf16: this CPU has no native bf16 ({why}); a {GEMM}x{GEMM}x{GEMM} bf16 GEMM took {ratio:.1f}x "
            f"the fp32 time here (measured at startup; bf16 autocast ran 5-20x slower than fp32 on AVX2 CPUs), so the run "
            f"computes in fp32 (autocast off; weights, gradients and AdamW state fp32 as under bf16 autocast) -- "
            f"train.cpu_bf16: autocast keeps bf16 autocast")
    return Precision(requested, "fp32", note)
