"""`dsv3 launch` of a layout that does not match the worker count: one line naming our YAML's keys
(`parallel.*`; docs/distributed.md's first example once started a 1-process config on 8 workers and the
error named MindSpore's `parallel_config`) and what to change."""

from __future__ import annotations

import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_world_size_mismatch_names_our_keys(tmp_path):
    log = tmp_path / "log"
    p = subprocess.run([sys.executable, "-m", "dsv3", "launch", "train --config pretrain_tiny_cpu", "2", "2", "127.0.0.1",
                        str(free_port()), "0", str(log), "True", "120"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr
    assert err[0] == ("dsv3 train: error: parallel (MindSpore: parallel_config): data_parallel 1 x model_parallel 1 x "
                      "pipeline_stage 1 = 1 processes, but the launcher started 2 (WORLD_SIZE); make the product 2 "
                      "(e.g. --set parallel.data_parallel=2) or start 1 worker"), err
