"""A base install (no extras) trains to the end: without matplotlib or tensorboard `dsv3 train`
exits 0 with every result written and one line saying how to get plots / TensorBoard events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
# the `dsv3` CLI in a process where these optional packages cannot be imported (as after `pip install dsv3`)
BLOCKED = ("matplotlib", "tensorboard", "torch.utils.tensorboard")
WRAPPER = ("import sys\nfor m in %r: sys.modules[m] = None\nfrom dsv3.cli import main\nsys.exit(main(sys.argv[1:]))" % (BLOCKED,))


def tiny_run_yaml(tmp: Path, **sections) -> Path:
    """A 2-step run of a tiny model (vocab 256) on a synthetic .bin/.idx; returns the YAML's path."""
    from dsv3.data.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp / "syn_text_document")
    b = IndexedDatasetBuilder(prefix + ".bin")
    rng = np.random.default_rng(0)
    for _ in range(64):
        b.add_document((rng.integers(0, 256) + rng.integers(1, 4) * np.arange(33)) % 256, [33])
    b.finalize(prefix + ".idx")
    model = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["model"]
    model.update(vocab_size=256, num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    d = {"model": model, "data": {"data_path": [prefix], "split": "90,10,0", "seq_length": 32},
         "train": {"steps": 2, "batch_size": 2, "device": "cpu", "threads": 1},
         "checkpoint": {"output_dir": str(tmp / "run")}, "eval": {"eval_steps": 1, "eval_iters": 1},
         "logging": {"progress_bar": False}}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_train_without_optional_packages(tmp_path):
    cfg = tiny_run_yaml(tmp_path, logging={"tensorboard": True, "plots": True})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", WRAPPER, "train", "--config", str(cfg)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    plot_lines = [ln for ln in proc.stderr.splitlines() if "matplotlib is not installed" in ln]
    assert len(plot_lines) == 1 and "pip install" in plot_lines[0] and "dsv3 plot" in plot_lines[0], plot_lines
    tb_lines = [ln for ln in proc.stderr.splitlines() if "tensorboard package" in ln]
    assert len(tb_lines) == 1 and "pip install tensorboard" in tb_lines[0], tb_lines
    run = tmp_path / "run"
    assert (run / "hf" / "config.json").is_file() and (run / "metrics.jsonl").is_file()
    assert not (run / "plots").exists() and not (run / "tensorboard").exists()
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 2


def test_dsv3_plot_without_the_package_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", WRAPPER, "plot", str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "pip install matplotlib" in proc.stderr
