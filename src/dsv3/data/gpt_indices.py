"""The index arithmetic behind `dsv3.data.gpt_dataset`, index-for-index equal to megatron-core.

* split / blend parsing (BlendedMegatronDatasetConfig): `parse_split`, `split_bookends`, `parse_data_path`;
* index construction (GPTDataset._build_document_sample_shuffle_indices): `num_epochs_for`,
  `build_document_index`, `build_sample_index` (and its readable reference), `build_shuffle_index`;
* caching: `_cached` loads index arrays from `.npy` files keyed by an md5 of what determines them,
  or builds and saves them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from dsv3.errors import UserError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# split / blend parsing (BlendedMegatronDatasetConfig)


def parse_split(split: str) -> list[float]:
    """ "949,50,1" -> [0.949, 0.05, 0.001] (padded to three with zeros, normalised)."""
    vals = [float(x) for x in re.findall(r"[.0-9]+", str(split))]
    if not vals or len(vals) > 3 or sum(vals) <= 0:
        raise UserError(f"split {split!r}: expected up to three non-negative numbers, e.g. '949,50,1'")
    vals += [0.0] * (3 - len(vals))
    total = float(np.sum(np.asarray(vals, np.float64)))
    return (np.asarray(vals, np.float64) / total).tolist()


def split_bookends(split: str) -> list[tuple[float, float] | None]:
    """[0.99, 0.01, 0] -> [(0, 0.99), (0.99, 1.0), None]."""
    out, beg = [], 0.0
    for v in parse_split(split):
        end = beg + v
        out.append((beg, end) if end > beg else None)
        beg = end
    return out


def parse_data_path(data_path: Sequence) -> tuple[list[str], list[float] | None]:
    """Megatron's `get_blend_from_list`: odd length -> prefixes only; even -> weight/prefix pairs
    (unless the would-be weights are not numbers, then all are prefixes)."""
    items = [str(x).strip() for x in data_path]
    if len(items) % 2 == 1:
        return items, None
    try:
        weights = [float(items[i]) for i in range(0, len(items), 2)]
    except ValueError:
        return items, None
    if any(w <= 0 for w in weights):
        raise UserError(f"data_path weights must be positive, got {weights}")
    return [items[i] for i in range(1, len(items), 2)], weights


# ---------------------------------------------------------------------------------------------
# index construction (GPTDataset._build_document_sample_shuffle_indices)


def num_epochs_for(tokens_per_epoch: int, num_samples: int | None, seq_length: int) -> int:
    """Smallest E with E * tokens_per_epoch >= num_samples * L + 1 (1 when num_samples is None)."""
    if num_samples is None:
        return 1
    need = num_samples * seq_length + 1
    return max(1, -(-need // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    if not separate_final_epoch or num_epochs == 1:
        doc_index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        rng.shuffle(doc_index)
        return doc_index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def _num_samples_in_index(num_epochs: int, tokens_per_epoch: int, seq_length: int, drop_last: bool) -> int:
    if drop_last:
        return (num_epochs * tokens_per_epoch - 1) // seq_length
    return math.ceil((num_epochs * tokens_per_epoch - 1) / seq_length)


def _sample_index_dtype(sizes: np.ndarray, document_index: np.ndarray):
    big = max(len(document_index), int(sizes.max()) if len(sizes) else 0)
    return np.int32 if big <= np.iinfo(np.int32).max else np.int64


def build_sample_index_reference(sizes: np.ndarray, document_index: np.ndarray, seq_length: int,
                                 num_epochs: int, tokens_per_epoch: int, drop_last: bool = True) -> np.ndarray:
    """Readable port of Megatron's C++ `build_sample_idx` (one walk over the documents).
    Row k = (position in document_index, offset) of the first token of sample k; row k+1 is its
    last token, which is also the first token of sample k+1."""
    n = _num_samples_in_index(num_epochs, tokens_per_epoch, seq_length, drop_last)
    out = np.zeros((n + 1, 2), dtype=_sample_index_dtype(sizes, document_index))
    d, off = 0, 0
    for k in range(1, n + 1):
        need = seq_length + 1
        while need != 0:
            length = int(sizes[document_index[d]]) - off
            need -= length
            if need <= 0:
                off += length + need - 1  # the last consumed token
                need = 0
            elif d == len(document_index) - 1:  # ran out of documents (only a kept partial sample)
                off = int(sizes[document_index[d]]) - 1
                break
            else:
                d, off = d + 1, 0
        out[k] = (d, off)
    return out


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_epochs: int, tokens_per_epoch: int, drop_last: bool = True) -> np.ndarray:
    """Vectorised `build_sample_index_reference` (same result; tested against it and megatron-core).

    The end of sample k is global token position p = k * L of the concatenated documents; it lies
    in the document d whose span [start_d, end_d) contains p (empty documents contain nothing)."""
    n = _num_samples_in_index(num_epochs, tokens_per_epoch, seq_length, drop_last)
    dtype = _sample_index_dtype(sizes, document_index)
    lengths = np.asarray(sizes, dtype=np.int64)[document_index]
    ends = np.cumsum(lengths)
    total = int(ends[-1])
    pos = np.arange(1, n + 1, dtype=np.int64) * seq_length
    partial = pos > total - 1  # only possible when the last partial sample is kept
    pos = np.minimum(pos, total - 1)
    d = np.searchsorted(ends, pos, side="right")
    out = np.zeros((n + 1, 2), dtype=dtype)
    out[1:, 0] = d
    out[1:, 1] = pos - (ends[d] - lengths[d])
    if partial.any():  # the C++ walk stops at the very last document, whatever its length
        out[1:][partial] = (len(document_index) - 1, lengths[-1] - 1)
    return out


# ---------------------------------------------------------------------------------------------
# caching


def _cache_dir(cache_dir: str | None, prefix: str) -> Path:
    if cache_dir:
        return Path(cache_dir)
    return Path(prefix).resolve().parent / "cache" / "GPTDataset_indices"


def _cached(cache_dir: str | None, prefix: str, kind: str, description: str, names: tuple[str, ...], build):
    """Load `names` arrays from the cache (`cache_dir`, default beside the dataset `prefix`; keyed by
    md5(description)) or build and save them.
    Files are written under temporary names and renamed; an unwritable cache just logs a warning."""
    digest = hashlib.md5(description.encode("utf-8")).hexdigest()
    d = _cache_dir(cache_dir, prefix)
    paths = [d / f"{digest}-{kind}-{n}.npy" for n in names]
    if all(p.is_file() for p in paths):
        return tuple(np.load(p, mmap_mode="r") for p in paths)
    arrays = build()
    try:
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{digest}-{kind}-description.txt").write_text(description)
        for p, a in zip(paths, arrays):
            fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{p.name}.", suffix=".npy")
            with os.fdopen(fd, "wb") as f:
                np.save(f, a)
            os.replace(tmp, p)
    except OSError as e:
        log.warning("could not cache dataset indices in %s (%s); set cache_dir to a writable folder", d, e)
    return arrays
