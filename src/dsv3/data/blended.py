"""Blending several GPT datasets by weight, exactly like Megatron's `BlendedDataset`.

Sample k of the blend comes from dataset `argmax_i (w_i * max(k, 1) - count_i)` (ties -> lowest i),
and is that dataset's next unused sample (`spec/training.md` §a.5; Megatron's C++
`build_blending_indices`). The indices are cached as `.npy` next to the GPT indices.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from dsv3.errors import UserError


def normalize(weights: Sequence[float]) -> list[float]:
    w = np.asarray(weights, dtype=np.float64)
    return (w / w.sum()).tolist()


def size_per_dataset(weights: Sequence[float], target: int, surplus: float = 0.0) -> list[int]:
    """Samples to request from each component: `ceil(ceil(target * w) * (1 + surplus))`."""
    return [int(math.ceil(math.ceil(target * w) * (1 + surplus))) for w in weights]


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (dataset_index int16 [size], dataset_sample_index int64 [size]); weights normalised.

    A plain loop (the greedy rule has no closed form that keeps the C++ tie-breaking and float
    rounding); about 1 s per million samples, and the result is cached."""
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    ids = range(1, len(w))
    for k in range(size):
        kk = float(max(k, 1))
        best, best_err = 0, w[0] * kk - counts[0]
        for i in ids:
            err = w[i] * kk - counts[i]
            if err > best_err:  # strict: ties keep the lowest index, as in Megatron
                best, best_err = i, err
        dataset_index[k] = best
        sample_index[k] = counts[best]
        counts[best] += 1
    return dataset_index, sample_index


def build_exhaustive_blending_indices(sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of every dataset exactly once, interleaved in proportion to `sizes`
    (Megatron's `build_exhaustive_blending_indices`, used when no weights and no size are given)."""
    total = int(sum(sizes))
    w = [s / float(total) for s in sizes]
    counts = [0] * len(sizes)
    unspent = [i for i, s in enumerate(sizes) if s > 0]
    dataset_index = np.zeros(total, dtype=np.int16)
    sample_index = np.zeros(total, dtype=np.int64)
    for k in range(total):
        kk = float(max(k, 1))
        best, best_err = -1, -math.inf
        for i in unspent:
            err = w[i] * kk - counts[i]
            if err > best_err:
                best, best_err = i, err
        dataset_index[k] = best
        sample_index[k] = counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            unspent.remove(best)
    return dataset_index, sample_index


class BlendedDataset(torch.utils.data.Dataset):
    """Weighted mixture of datasets; `item["dataset_id"]` says which one a sample came from."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int | None,
                 dataset_index: np.ndarray | None = None, dataset_sample_index: np.ndarray | None = None):
        self.datasets = list(datasets)
        self.weights = normalize(weights) if size is not None else list(weights)
        self.size = size
        if dataset_index is None:
            if size is not None:
                dataset_index, dataset_sample_index = build_blending_indices(self.weights, size)
            else:
                dataset_index, dataset_sample_index = build_exhaustive_blending_indices([int(x) for x in weights])
        self.dataset_index, self.dataset_sample_index = dataset_index, dataset_sample_index
        used = np.bincount(self.dataset_index.astype(np.int64), minlength=len(self.datasets))
        for i, (n, ds) in enumerate(zip(used, self.datasets)):
            if n > len(ds):
                raise UserError(f"the blend takes {n} samples from dataset {i} ({getattr(ds, 'prefix', '?')}), "
                                f"which has only {len(ds)}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> dict:
        d = int(self.dataset_index[idx])
        item = self.datasets[d][int(self.dataset_sample_index[idx])]
        item["dataset_id"] = torch.tensor(d, dtype=torch.int64)
        return item
