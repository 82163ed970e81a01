"""Torch thread count on a busy machine (`dsv3.threads`): the rule on injected readings, and the real
CLI under real load (busy-loop processes) choosing fewer threads and saying why in its log line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv3 import threads
from dsv3.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    for name in (threads.ENV, "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("cpus,busy,local,expect", [
    (8, 0.0, 1, 8),     # quiet: every CPU
    (8, 3.2, 1, 5),     # three CPUs taken by other work
    (2, 6.5, 1, 1),     # load 5-8 on 2 cores (the machine): 1, not 2
    (8, 2.0, 2, 3),     # 6 free CPUs shared by 2 ranks of one job
    (4, 0.0, 8, 1),     # more ranks than CPUs: still 1 each
])
def test_auto_rule(clean_env, cpus, busy, local, expect):
    c = threads.choose(cpus=cpus, busy=busy, local_ranks=local)
    assert c.threads == expect
    assert c.reason.startswith(f"auto: {cpus} CPUs, {busy:.1f} busy with other work"), c.reason


def test_order_flag_then_env_then_omp(clean_env, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose(cpus=8, busy=0) == threads.Choice(3, "$OMP_NUM_THREADS")
    monkeypatch.setenv(threads.ENV, "2")
    assert threads.choose(cpus=8, busy=0) == threads.Choice(2, f"${threads.ENV}")
    assert threads.choose(5, cpus=8, busy=0) == threads.Choice(5, "--threads")
    assert threads.Choice(1, "--threads").line() == "dsv3: 1 torch thread (--threads)"


def test_bad_counts_are_one_line(clean_env, monkeypatch):
    with pytest.raises(UserError, match="^--threads must be >= 1, got 0$"):
        threads.choose(0)
    monkeypatch.setenv(threads.ENV, "many")
    with pytest.raises(UserError, match=r"^\$DSV3_NUM_THREADS='many': expected a whole number of threads >= 1$"):
        threads.choose()


def test_busy_reading_ignores_this_process_and_its_siblings():
    readings = iter([(0.4, 5), (0.4, 4), (0.4, 5), (0.4, 9), (0.4, 5)])  # median 5 runnable, one is this process
    assert threads.busy_cpus(read=lambda: next(readings), samples=5) == 4.0
    assert threads.busy_cpus(siblings=1, read=lambda: (3.0, 1), samples=1) == 2.0  # the 1-minute average dominates
    assert threads.read_loadavg()[1] >= 1  # the real file parses (this process is running)


def _generate(model: Path, *pre: str, env_extra: dict | None = None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in (threads.ENV, "OMP_NUM_THREADS")}
    env.update(PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {}))
    r = subprocess.run([sys.executable, "-m", "dsv3", *pre, "generate", "--model", str(model), "--device", "cpu", "--raw",
                        "--input", "Hello", "--max-tokens", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return [ln for ln in r.stderr.splitlines() if "torch thread" in ln]


@pytest.mark.extended  # ~30 s; test_auto_rule and test_busy_reading_* cover the rule and the load reading in the default run
def test_cli_under_real_load_takes_one_thread_and_says_why(tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "serve"))
    from serve_helpers import write_tiny_model

    model = write_tiny_model(tmp_path / "tiny")
    cpus = threads.cpu_count()
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus + 2)]
    try:
        time.sleep(0.5)
        auto = _generate(model)
        explicit = _generate(model, "--threads", "2")  # the global option, before the verb
    finally:
        for p in spin:
            p.kill()
            p.wait()
    assert len(auto) == 1 and auto[0].startswith(f"dsv3: 1 torch thread (auto: {cpus} CPU"), auto
    busy = float(auto[0].split(", ")[1].split()[0])
    assert busy >= cpus + 1, auto  # the spinning processes were seen
    assert explicit == ["dsv3: 2 torch threads (--threads)"]
    assert _generate(model, env_extra={threads.ENV: "3"}) == ["dsv3: 3 torch threads ($DSV3_NUM_THREADS)"]


def test_train_logs_its_count_and_the_flag_beats_the_yaml(tmp_path):
    """`dsv3 train`: the YAML's train.threads (2 here) applies unless --threads says otherwise; the trainer logs it."""
    import numpy as np

    sys.path.insert(0, str(REPO / "tests" / "train"))
    from run_config import small_run

    from dsv3.config.load import dump_yaml
    from dsv3.data.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "ok_text_document")
    b = IndexedDatasetBuilder(f"{prefix}.bin", np.int32)
    for row in np.random.default_rng(0).integers(2, 1000, size=(40, 33)):
        b.add_document(row, [len(row)])
    b.finalize(f"{prefix}.idx")
    lines = []
    for pre in ([], ["--threads", "1"]):
        dump_yaml(small_run(prefix, tmp_path / f"out{len(pre)}", train={"steps": 1}), tmp_path / "run.yaml")
        env = {k: v for k, v in os.environ.items() if k not in (threads.ENV, "OMP_NUM_THREADS")}
        env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
        r = subprocess.run([sys.executable, "-m", "dsv3", "train", *pre, "--config", str(tmp_path / "run.yaml")], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        lines.append([ln for ln in r.stderr.splitlines() if "torch thread" in ln])
    assert lines == [["dsv3: 2 torch threads (train.threads)"], ["dsv3: 1 torch thread (--threads)"]]


def test_cap_at_torchs_default_on_a_quiet_machine(clean_env):
    c = threads.choose(cpus=16, busy=0.0, cap=8)  # 16 hyperthreads, torch's default one per physical core
    assert c == threads.Choice(8, "auto: 16 CPUs, 0.0 busy with other work, at most torch's default 8")
    assert threads.choose(cpus=16, busy=10.0, cap=8).threads == 6
