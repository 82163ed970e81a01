"""ResumableLoader: in order, deterministic, resumes mid-epoch without repeating samples."""

from __future__ import annotations

import numpy as np
import torch

from dsv3.data.gpt_dataset import GPTDatasetConfig, build_gpt_datasets
from dsv3.data.indexed_dataset import IndexedDatasetBuilder
from dsv3.data.loader import ResumableLoader


def _dataset(tmp_path):
    rng = np.random.default_rng(0)
    b = IndexedDatasetBuilder(f"{tmp_path}/d.bin", np.int32)
    for _ in range(60):
        b.add_item(rng.integers(2, 1000, int(rng.integers(5, 40))))
        b.end_document()
    b.finalize(f"{tmp_path}/d.idx")
    cfg = GPTDatasetConfig(seq_length=16, data_path=[f"{tmp_path}/d"], cache_dir=str(tmp_path / "c"))
    return build_gpt_datasets(cfg, (50, 0, 0))[0]


def _ids(batch):
    return [tuple(r.tolist()) for r in batch["tokens"]]


def test_resume_mid_epoch(tmp_path):
    ds = _dataset(tmp_path)
    full = [s for b in ResumableLoader(ds, batch_size=4) for s in _ids(b)]
    assert len(full) == len(ds) // 4 * 4 and full[0] == tuple(ds[0]["tokens"].tolist())
    first = ResumableLoader(ds, batch_size=4)
    it = iter(first)
    seen = [s for _ in range(3) for s in _ids(next(it))]
    state = first.state_dict()
    assert state["consumed_samples"] == 12
    resumed = ResumableLoader(ds, batch_size=4, num_workers=1)
    resumed.load_state_dict(state)
    assert len(resumed) == len(ds) // 4 - 3
    rest = [s for b in resumed for s in _ids(b)]
    assert seen + rest == full  # nothing repeated, nothing skipped, same order
    b = next(iter(ResumableLoader(ds, batch_size=2)))
    assert b["tokens"].shape == (2, 16) and b["loss_mask"].dtype == torch.float32


def test_data_parallel_ranks_partition_global_batches(tmp_path):
    ds = _dataset(tmp_path)
    full = [s for b in ResumableLoader(ds, batch_size=6) for s in _ids(b)]
    r0 = list(ResumableLoader(ds, batch_size=3, dp_rank=0, dp_size=2))
    r1 = list(ResumableLoader(ds, batch_size=3, dp_rank=1, dp_size=2))
    merged = [s for a, b in zip(r0, r1) for s in _ids(a) + _ids(b)]
    assert merged == full


def test_cycle(tmp_path):
    ds = _dataset(tmp_path)
    loader = ResumableLoader(ds, batch_size=8, cycle=True)
    n = len(ds) // 8
    batches = [b for _, b in zip(range(n + 2), loader)]
    assert _ids(batches[n]) == _ids(batches[0]) and loader.epoch == 1
