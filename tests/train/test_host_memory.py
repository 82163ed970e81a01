"""`train.cpu_allocator`: with `cache` a training step's freed gradients and activations stay in the
process for the next step (no page faults, no zeroing by the kernel); with the C library's defaults
they go back to the OS and every step faults them in again. Counted as minor page faults per step of
a small training loop in a fresh interpreter (the setting is process-wide and cannot be undone)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from dsv3.config.train import run_config_from_dict
from dsv3.errors import UserError

PROBE = """
import resource, sys, torch
from dsv3.train.host_memory import keep_freed_memory
if sys.argv[1] == "cache":
    assert keep_freed_memory() is None
    assert keep_freed_memory() is None  # idempotent
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(3)])  # 64 MiB matrices
opt = torch.optim.AdamW(model.parameters(), fused=True)
faults = []
for step in range(8):  # a training loop: fresh gradients every step (zero_grad(set_to_none=True))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(torch.randn(256, 4096)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[4:]))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_cache_keeps_freed_pages_for_the_next_step():
    out = {}
    for mode in ("system", "cache"):
        proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = int(proc.stdout.split()[-1])
    # glibc's default: every step faults its 192 MiB of gradients in again (4 KiB pages: ~49k faults a step)
    assert out["system"] > 4 * 30_000, out
    assert out["cache"] < out["system"] / 5, out  # cache: once the heap has grown (a step or two), pages are reused


def test_cpu_allocator_key_is_checked():
    cfg = run_config_from_dict({"train": {"cpu_allocator": "system"}})
    assert cfg.train.cpu_allocator == "system"
    with pytest.raises(UserError, match="cpu_allocator"):
        run_config_from_dict({"train": {"cpu_allocator": "jemalloc"}})
