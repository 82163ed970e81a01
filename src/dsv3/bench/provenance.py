"""What every benchmark result file records about how and where it was taken: the command, the git
commit, the load average, the CPU model and the ISA extensions the kernels dispatch on, torch's
version. A figure without its CPU cannot be compared (an AVX2 machine without VNNI and an AVX-512
one rank the same kernels differently)."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx_vnni", "avx512_bf16")
"""/proc/cpuinfo flags the CPU kernels care about; every `amx*` flag present is recorded too."""

HIDDEN = "unknown (hypervisor hides it)"


def cpu_info(text: str | None = None) -> dict:
    """CPU model (its family/model/stepping numbers too: a hypervisor that hides the name often
    leaves them), and which of `ISA_FLAGS` and the AMX flags the first processor lists. `text`:
    /proc/cpuinfo's content (read here when None; elsewhere than Linux the fields say unknown)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    numbers = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    return {
        "cpu_model": fields.get("model name") or HIDDEN,
        "cpu_family_model_stepping": ", ".join(numbers) or "unknown",
        "isa": {f: f in flags for f in ISA_FLAGS} | {f: True for f in sorted(flags) if f.startswith("amx")},
        "logical_cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def git_commit(repo: Path) -> str:
    """HEAD's commit (with `-dirty` when tracked files differ), or 'unknown' outside a git checkout."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def provenance(repo: Path | None = None) -> dict:
    """The record every bench result JSON carries under "provenance"."""
    import torch

    repo = repo or Path(__file__).resolve().parents[3]
    return {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(repo),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        **cpu_info(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
