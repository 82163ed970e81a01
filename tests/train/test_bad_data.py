"""`dsv3 train` on a bad .bin/.idx stops before training with one line (issue 10 item 7): token ids
outside the model's vocabulary (a raw IndexError at step 1 before, a device assert on GPU), negative
ids, and an index inconsistent with itself or with its .bin."""

from __future__ import annotations

import numpy as np
import pytest

from dsv3.cli import main as cli_main
from dsv3.config.load import dump_yaml
from dsv3.data.indexed_dataset import IndexedDatasetBuilder

from run_config import small_run


def _dataset(prefix, bad_id=None, dtype=np.int32):
    """40 sequences of 33 ids (seq_length 32 + 1); optionally one id replaced by `bad_id`."""
    ids = np.random.default_rng(0).integers(2, 1000, size=(40, 33))
    if bad_id is not None:
        ids[17, 5] = bad_id
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for row in ids:
        b.add_document(row, [len(row)])
    b.finalize(f"{prefix}.idx")
    return str(prefix)


def _train(capsys, tmp_path, prefix):
    cfg = small_run(prefix, tmp_path / "out", train={"steps": 1})
    dump_yaml(cfg, tmp_path / "run.yaml")
    rc = cli_main(["train", "--config", str(tmp_path / "run.yaml")])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("bad_id", [129280, 2**31 - 1, -3])
def test_token_ids_outside_the_vocabulary(capsys, tmp_path, bad_id):
    prefix = _dataset(tmp_path / "bad_text_document", bad_id)
    rc, err = _train(capsys, tmp_path, prefix)
    assert rc == 2 and len(err) == 1, err
    assert f"bad_text_document.bin: token id {bad_id} (token {17 * 33 + 5})" in err[0]
    assert "outside the model's vocabulary [0, 129280)" in err[0]
    assert not (tmp_path / "out").exists()


def test_bin_larger_than_its_index(capsys, tmp_path):
    prefix = _dataset(tmp_path / "big_text_document")
    with open(f"{prefix}.bin", "ab") as f:
        f.write(b"\0" * 64)
    rc, err = _train(capsys, tmp_path, prefix)
    assert rc == 2 and len(err) == 1 and "big_text_document.bin: larger than its index says" in err[0], err


def test_good_data_trains(capsys, tmp_path):
    rc, err = _train(capsys, tmp_path, _dataset(tmp_path / "ok_text_document"))
    assert rc == 0, err
