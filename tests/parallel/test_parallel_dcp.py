"""DCP checkpoint errors (saving under one layout and resuming under another, one process included,
runs through the trainer in test_parallel_train)."""

from __future__ import annotations

import pytest

from dsv3.errors import UserError
from dsv3.parallel.dcp import load
from parallel_harness import make_model, tiny_cfg


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a DCP checkpoint"):
        load(tmp_path, [make_model(tiny_cfg())])


# ------------------------------------------------------------- hostile .metadata (issue 25 S3)
class _Payload:
    """Unpickled, it would create the file `marker` (code execution)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _hostile_dir(d, cfg, marker, dsv3_layout: bool):
    """A directory `train.init_from` / `--resume` may be pointed at: the run's own architecture, and a
    `.metadata` pickle whose loading runs code. `dsv3_layout`: also the files `dsv3 train` writes
    beside a DCP checkpoint, with a manifest that verifies (anyone can write one)."""
    import json
    import pickle

    import torch

    from dsv3.checkpoint.reader import to_hf_dict
    from dsv3.config.load import dump_yaml
    from dsv3.train.checkpoint import write_manifest

    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    if dsv3_layout:
        torch.save({"step": 2}, d / "trainer_state.pt")
        dump_yaml(cfg, d / "config.resolved.yaml")
        write_manifest(d, 2)
    else:
        (d / "config.json").write_text(json.dumps(to_hf_dict(cfg.model)))


def _train_cli(tmp_path, cfg, *extra):
    import subprocess
    import sys

    from dsv3.config.load import dump_yaml

    conf = tmp_path / "run.yaml"
    dump_yaml(cfg, conf)
    return subprocess.run([sys.executable, "-m", "dsv3", "train", "--config", str(conf), *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("dsv3_layout", [False, True], ids=["hf-config-json", "dsv3-layout-forged-manifest"])
def test_init_from_never_unpickles_a_hostile_metadata(tmp_path, dsv3_layout):
    """`dsv3 train --set train.init_from=DIR`: a `.metadata` beside a matching config.json is not taken
    for a DCP checkpoint; in dsv3's own layout it is read through the allow-list. Its code never runs."""
    from parallel_harness import run_cfg, write_dataset

    marker = tmp_path / "PWNED"
    cfg = run_cfg(write_dataset(tmp_path), tmp_path / "out", {}, steps=1, save=False)
    src = tmp_path / "hostile"
    _hostile_dir(src, cfg, marker, dsv3_layout)
    r = _train_cli(tmp_path, cfg, "--set", f"train.init_from={src}")
    assert not marker.exists(), "the .metadata pickle ran code"
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    want = "refers to posix.system" if dsv3_layout else "is not a checkpoint written by `dsv3 train`"
    assert err[0].startswith("dsv3 train: error: train.init_from") and want in err[0], err


def test_resume_never_unpickles_a_hostile_metadata(tmp_path):
    """`dsv3 train --resume` over a forged `step-N/` (DCP layout, verifying manifest) in one process."""
    from parallel_harness import run_cfg, write_dataset

    marker = tmp_path / "PWNED"
    cfg = run_cfg(write_dataset(tmp_path), tmp_path / "out", {}, steps=3, save=False)
    _hostile_dir(tmp_path / "out" / "checkpoint" / "step-2", cfg, marker, dsv3_layout=True)
    r = _train_cli(tmp_path, cfg, "--resume")
    assert not marker.exists(), "the .metadata pickle ran code"
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and "refers to posix.system" in err[-1], r.stderr


def test_dcp_metadata_allow_list_reads_a_real_checkpoint(tmp_path):
    """What dsv3 itself writes passes the allow-list and loads back exactly."""
    import torch

    from dsv3.parallel.dcp import read_metadata, save

    src = make_model(tiny_cfg())
    save(tmp_path / "ck", [src])
    assert set(read_metadata(tmp_path / "ck").state_dict_metadata) == set(src.state_dict())
    dst = make_model(tiny_cfg(), seed=1)
    load(tmp_path / "ck", [dst])
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
