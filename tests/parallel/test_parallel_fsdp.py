"""FSDP's "returned a view tensor" warning (issue 25 use 7): every FSDP run logged it three times per
rank. The views are the output head's logits, consumed out of place only (dsv3.parallel.fsdp); the
warning is silenced for those units alone, and the FSDP run still equals one process."""

from __future__ import annotations

import os
import subprocess
import sys

from dsv3.config.load import dump_yaml
from parallel_harness import free_port, losses, run_cfg, write_dataset

TOL = 1e-5


def test_fsdp_run_has_no_view_warning_and_equals_one_process(tmp_path):
    from dsv3.train.trainer import Trainer

    prefix = write_dataset(tmp_path)
    layout = {"data_parallel": 2, "micro_batch_num": 2}  # FSDP over dp 2; one process accumulates the same batch
    Trainer(run_cfg(prefix, tmp_path / "ref", layout, steps=2, save=False, eval_steps=0), quiet=True).fit()
    conf = tmp_path / "dp2.yaml"
    dump_yaml(run_cfg(prefix, tmp_path / "dp2", layout, steps=2, save=False, eval_steps=0), conf)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                        "-m", "dsv3", "train", "--config", str(conf)], capture_output=True, text=True, timeout=420,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "returned a view tensor" not in r.stderr, r.stderr[-3000:]
    ref, got = losses(tmp_path / "ref"), losses(tmp_path / "dp2")
    assert len(got) == len(ref) == 2 and max(abs(a - b) for a, b in zip(got, ref)) <= TOL, (got, ref)
