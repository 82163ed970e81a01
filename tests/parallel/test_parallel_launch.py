"""`dsv3 launch`: msrun-style arguments, one log per rank, and the seed's 8-device layout
(dp2 mp2 pp2 ep2, micro_batch_num 4) as 8 CPU processes with the single-process losses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3.cli import main as cli_main
from parallel_harness import free_port, reference_losses, tiny_cfg

HERE = Path(__file__).parent


def test_seed_layout_8_processes(tmp_path):
    log_dir = tmp_path / "msrun_log"
    cmd = [sys.executable, "-m", "dsv3", "launch", f"{HERE / 'seed_layout_train.py'}",
           "8", "8", "127.0.0.1", str(free_port()), "0", str(log_dir), "True", "300"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher, torchrun and the workers share the group
        proc.communicate(timeout=60)
        pytest.fail("dsv3 launch timed out")
    logs = sorted(p.name for p in log_dir.glob("worker_*.log"))
    assert proc.returncode == 0, (err, (log_dir / "launcher_node0.log").read_text()[-3000:])
    assert logs == [f"worker_{r}.log" for r in range(8)]

    def losses(rank):
        lines = (log_dir / f"worker_{rank}.log").read_text().splitlines()
        return [json.loads(s)["loss"] for s in lines if s.startswith("{")]

    ref = reference_losses(tiny_cfg())
    got = losses(7)  # the last pipeline stage's rank, as in the seed guide
    assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-5 and len(got) == len(ref), (got, ref)
    assert losses(0) == [0.0] * len(ref)  # first stage: loss 0, as in the seed


@pytest.mark.parametrize("argv, match", [
    (["8", "3"], "WORKER_NUM 8 is not a multiple of LOCAL_WORKER 3"),
    (["8", "4", "127.0.0.1", "8118", "2"], r"NODE_RANK 2 must be in \[0, 1\]"),
    (["8", "8", "127.0.0.1", "99999"], "MASTER_PORT 99999 is not a TCP port"),
    (["8", "8", "127.0.0.1", "8118", "0", "log", "maybe"], "join must be True or False"),
    (["1", "1", "a", "1", "0", "l", "True", "5", "extra"], "too many positional arguments"),
])
def test_bad_arguments(argv, match, capsys, tmp_path):
    assert cli_main(["launch", "train --config x.yaml", *argv]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_msrun_command_translation():
    from dsv3.parallel.launch import worker_command

    assert worker_command("run_mindformer.py --register_path research/deepseek3 --config a.yaml") == ["train", "--config", "a.yaml"]
    assert worker_command("train --config b.yaml --set train.steps=2") == ["train", "--config", "b.yaml", "--set", "train.steps=2"]
