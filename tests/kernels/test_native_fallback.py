"""What a user meets through the CLI: `dsv3 info` names the kernel path, DSV3_ISA caps the ISA (the AVX2
path on this AVX-512 machine), a missing .so (DSV3_KERNELS_LIB pointed at nothing) or DSV3_ISA=none
falls back to torch's kernels with one line and still generates, and a bad DSV3_ISA is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3.kernels import native as nk

REPO = Path(__file__).resolve().parents[2]


def _dsv3(args: list[str], **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("DSV3_ISA", "DSV3_KERNELS_LIB")}
    e.update(env, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "dsv3", *args], capture_output=True, text=True, env=e, timeout=300)


INFO = ["info", "--config", "tiny"]


@pytest.mark.skipif(not nk.available(), reason="dsv3 native kernels not built")
def test_info_names_the_native_isa_and_dsv3_isa_caps_it():
    r = _dsv3(INFO)
    assert r.returncode == 0, r.stderr
    assert f"kernels: dsv3 native, ISA {nk.load().detected}" in r.stdout and "kernels per format:" in r.stdout
    r = _dsv3(INFO, DSV3_ISA="avx2")
    assert r.returncode == 0 and "kernels: dsv3 native, ISA avx2 " in r.stdout, r.stdout + r.stderr


def test_bad_dsv3_isa_is_one_line():
    r = _dsv3(INFO, DSV3_ISA="sse9")
    assert r.returncode != 0 and "DSV3_ISA='sse9'" in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("env", [{"DSV3_KERNELS_LIB": "/nonexistent/_kernels.so"}, {"DSV3_ISA": "none"}])
def test_fallback_says_so_once_and_still_generates(env, tiny_tok_ckpt):
    r = _dsv3(INFO, **env)
    assert r.returncode == 0 and "kernels: torch paths for every format" in r.stdout, r.stdout + r.stderr
    r = _dsv3(["generate", "--model", str(tiny_tok_ckpt), "--quantization", "int8", "--input", "hello", "--raw",
               "--max-tokens", "3", "--ignore-eos", "--num-blocks", "32"], **env)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "dsv3.kernels" in ln]
    assert len(lines) == 1 and "using torch's kernels" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
