"""bench/bench_serve_load.py runs as a user runs it, small: every malicious kind of issues 10 and 25 once
(one request in two), against the real `dsv3 serve` process; the result must pass (no innocent request
failed, every malicious one refused / answered / its connection closed, /health within the bound)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "serve"))
from serve_helpers import write_tiny_model  # noqa: E402


def test_serve_load_with_every_malicious_kind(tmp_path):
    model = write_tiny_model(tmp_path / "model")
    sys.path.insert(0, str(REPO / "bench"))
    from bench_serve_load import issue25_bodies, malicious_bodies

    kinds = len(malicious_bodies(512))
    assert len(issue25_bodies()) == 9
    out = tmp_path / "load.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, str(REPO / "bench" / "bench_serve_load.py"), "--model", str(model),
           "--num-prompts", str(2 * kinds), "--malicious-every", "2", "--concurrency", "4", "--input-len", "16",
           "--output-len", "4", "--idle-health-probes", "5", "--max-health-s", "2.0", "--slow-headers-wait", "20",
           "--max-growth-mb", "200",
           "--server-args", "--dtype float32 --device cpu --max-num-seqs 8 --header-timeout 2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    res = json.loads(out.read_text())
    by_kind = res["malicious_by_kind"]
    assert len(by_kind) == kinds and all(k["sent"] == 1 for k in by_kind.values()), by_kind
    assert res["errors"] == 0 and res["completed"] == res["well_formed"] == kinds, res["first_errors"]
    assert res["malicious_ok"] == kinds, res["malicious_failures"]
    assert by_kind["S7_stalled_headers"]["statuses"] == ["closed"]
    assert proc.returncode == 0 and res["pass"] is True, (proc.stdout[-2000:], proc.stderr[-2000:])
