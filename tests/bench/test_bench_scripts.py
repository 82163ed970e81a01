"""The benchmark scripts run as a user runs them (tiny sizes), so an API change cannot break them silently.

Timings are not checked (they live in bench/results, taken on a quiet machine); the correctness
fields each script computes are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_decode_runs_and_matches_transformers(tmp_path):
    r = _run("bench_decode.py", "--config", "tiny", "--prompt-len", "16", "--new-tokens", "4", "--batch", "2",
             "--threads", "1", out=tmp_path / "decode.json")
    assert r["greedy_tokens_equal_hf"] is True and r["batch_tokens_equal_alone"] is True
    assert r["dsv3_b1_tok_s"] > 0 and r["hf_b1_tok_s"] > 0 and r["git_commit"]
    assert r["provenance"]["isa"] and r["provenance"]["cpu_model"] and "bench_decode.py" in r["provenance"]["command"]


def test_bench_forward_quantized_runs(tmp_path):
    r = _run("bench_forward.py", "--config", "tiny", "--tokens", "32", "--repeats", "1", "--threads", "1",
             "--quantization", "w8a8", out=tmp_path / "forward.json")
    assert r["quantization"] == "w8a8" and r["max_abs_logit_diff"] < 0.1 and r["git_commit"]
    assert r["provenance"]["torch"] and "avx2" in r["provenance"]["isa"]


def test_provenance_names_the_cpu_and_its_isa():
    """The CPU model and ISA flags of /proc/cpuinfo's first processor; a hidden model name says so."""
    from dsv3.bench.provenance import HIDDEN, cpu_info

    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
            "model name\t: AMD EPYC 7B13\nstepping\t: 1\nflags\t\t: fpu avx2 fma avx512f avx512bw amx_tile amx_int8\n\n"
            "processor\t: 1\nmodel name\t: other\nflags\t\t: avx512_vnni\n")
    info = cpu_info(text)
    assert info["cpu_model"] == "AMD EPYC 7B13" and info["cpu_family_model_stepping"] == "cpu family 25, model 1, stepping 1"
    assert info["isa"]["avx2"] and info["isa"]["avx512bw"] and not info["isa"]["avx512_vnni"] and not info["isa"]["avx_vnni"]
    assert info["isa"]["amx_tile"] and info["isa"]["amx_int8"]
    hidden = cpu_info("processor\t: 0\nflags\t\t: avx2 fma\n")
    assert hidden["cpu_model"] == HIDDEN and hidden["isa"]["fma"] and not hidden["isa"]["avx512f"]
