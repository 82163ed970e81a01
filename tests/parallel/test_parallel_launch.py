"""`dsv3 launch` argument handling (the multi-process runs are in test_parallel_train)."""

from __future__ import annotations

import re

import pytest

from dsv3.cli import main as cli_main


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


def test_torchrun_command():
    import argparse

    from dsv3.parallel.launch import add_arguments, resolve, torchrun_argv

    p = argparse.ArgumentParser()
    add_arguments(p)
    conf = resolve(p.parse_args(["train --config a.yaml", "1024", "8", "10.0.0.1", "8118", "5", "out/log", "False", "7200"]))
    argv = torchrun_argv(conf, "train --config a.yaml")
    assert argv[1:] == ["-m", "torch.distributed.run", "--nnodes", "128", "--nproc-per-node", "8", "--node-rank", "5",
                        "--master-addr", "10.0.0.1", "--master-port", "8118", "-m", "dsv3.parallel.worker", "out/log",
                        "train", "--config", "a.yaml"]
    assert conf["join"] is False and conf["cluster_time_out"] == 7200
