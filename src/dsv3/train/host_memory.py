"""`train.cpu_allocator`: how a CPU run's host memory is allocated.

torch allocates CPU tensors with the C library's malloc and frees them when the last reference goes.
glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh `mmap` and returns
it to the kernel on free, so each training step faults in and zeroes its gradients and large
activations page by page again (4 GiB of gradients per step for the 1B config: about a million page
faults). `cache` (the default on CPU) tells glibc to serve large blocks from its heap and never trim
it, the CPU counterpart of torch's CUDA caching allocator (and of running under jemalloc/tcmalloc,
which Intel's PyTorch CPU guide recommends): the second step onwards reuses the first step's pages.
The resident set stays at the run's peak instead of shrinking between steps. `system` leaves the C
library's defaults. On a C library other than glibc, `cache` is reported and not applied.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> str | None:
    """Apply `cache` to this process (idempotent). None when applied, else why not (one line)."""
    global _applied
    if _applied:
        return None
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return f"train.cpu_allocator: cache needs glibc (this C library: {libc_name or 'unknown'}); the system allocator is used"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success: no mmap-backed blocks (large blocks come from the heap), no trimming
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) != 1:
        return "train.cpu_allocator: cache: glibc mallopt refused the settings; the system allocator is used"
    _applied = True
    return None
