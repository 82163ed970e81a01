"""GPT pretraining samples from Megatron `.bin/.idx` data, index-for-index equal to megatron-core.

`build_gpt_datasets(cfg, num_samples=(train, valid, test))` does what Megatron's
`BlendedMegatronDatasetBuilder(GPTDataset, ...)` does (`spec/training.md` §a.5-a.6):

* split: "a,b,c" is normalised and cut over the SEQUENCES of each dataset:
  split i = sequences `[round(beg_i * N), round(end_i * N))`; a zero-width split is None.
* one dataset per split: enough epochs E that `E * tokens >= num_samples * L + 1`;
  `document_index` = the split's sequence ids tiled E times and shuffled (the last epoch shuffled on
  its own when it contributes < 80% of an epoch's samples); `sample_index[k] = (i, offset)` of the
  first token of sample k (samples are L+1 tokens and overlap by one); `shuffle_index` a permutation
  of the samples. One `RandomState(seed)` is used for all shuffles in that order.
* `data_path` with weights (`[w1, p1, w2, p2, ...]`, even a single `[1, p]`): a `BlendedDataset`
  whose components are asked for `ceil(ceil(n * w_i) * 1.005)` samples each.

Sample k -> `tokens = text[:-1]`, `labels = text[1:]` (int64 [L]), `loss_mask` (float32 [L], 0 where
the INPUT is EOD with `eod_mask_loss`), `position_ids` (int64 [L], restarting after each EOD with
`reset_position_ids`) and, only with `reset_attention_mask`, `attention_mask` (bool [L, L],
True = may attend: causal within each document; note Megatron's mask has the opposite polarity).
DeepSeek-V3 packs documents with no cross-document masking: all three options False (the default).

Indices are cached as `.npy` under `cache_dir` (default `<data dir>/cache/GPTDataset_indices`),
keyed by an md5 of everything that determines them, including the `.idx` file's size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dsv3.data.indexed_dataset import IndexedDataset, idx_path
from dsv3.errors import UserError

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")


@dataclass
class GPTDatasetConfig:
    """How to draw GPT samples from Megatron datasets (Megatron's GPTDatasetConfig, our names)."""

    seq_length: int
    """Tokens per sample (each sample reads seq_length + 1 tokens: inputs and shifted labels)."""
    data_path: list = field(default_factory=list)
    """Dataset prefixes `[p1, p2, ...]`, or weights and prefixes `[w1, p1, w2, p2, ...]` (weights blend)."""
    split: str = "1,0,0"
    """Train/valid/test proportions over each dataset's sequences, e.g. "949,50,1"."""
    seed: int = 1234
    """Seed of the numpy RandomState that shuffles documents and samples (Megatron --seed)."""
    reset_position_ids: bool = False
    """Restart position ids after each EOD token."""
    reset_attention_mask: bool = False
    """Block attention across EOD tokens (adds `attention_mask` to each sample)."""
    eod_mask_loss: bool = False
    """Zero the loss where the input token is EOD."""
    eod_id: int = 1
    """End-of-document id (DeepSeek-V3: EOS = 1)."""
    pad_id: int = -1
    """Pad id for short (partial validation) samples; -1 never occurs in data (Megatron's choice
    when the tokenizer's pad collides with EOD, as DeepSeek's pad = EOS does)."""
    cache_dir: str | None = None
    """Where index files are cached; None -> `<dir of the first dataset>/cache/GPTDataset_indices`."""
    surplus: float = 0.005
    """Extra fraction of samples built per blend component (Megatron mid_level_dataset_surplus)."""
    drop_last_partial_validation_sequence: bool = True
    """Drop the final partial sample of the validation split (Megatron default); train always drops it."""

    def __post_init__(self):
        if self.seq_length < 2:
            raise UserError(f"seq_length {self.seq_length}: must be at least 2")
        if not self.data_path:
            raise UserError("data_path is empty: give dataset prefixes or [weight, prefix, ...]")


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
# the dataset


def _ltor_masks(tokens: torch.Tensor, cfg: GPTDatasetConfig):
    """loss_mask, position_ids and (optionally) the per-document causal mask of one sample."""
    L = tokens.numel()
    loss_mask = torch.ones(L, dtype=torch.float32)
    if cfg.eod_mask_loss:
        loss_mask[tokens == cfg.eod_id] = 0.0
    position_ids = torch.arange(L, dtype=torch.int64)
    attention_mask = None
    if cfg.reset_position_ids or cfg.reset_attention_mask:
        # document id of each position: documents end AFTER an EOD input token
        eod = (tokens == cfg.eod_id).to(torch.int64)
        doc = torch.cumsum(eod, 0) - eod  # [L]
        if cfg.reset_position_ids:
            starts = torch.zeros(L, dtype=torch.int64)
            first = torch.ones(L, dtype=torch.bool)
            first[1:] = doc[1:] != doc[:-1]
            starts[first] = position_ids[first]
            position_ids = position_ids - torch.cummax(starts, 0).values
        if cfg.reset_attention_mask:
            causal = torch.ones(L, L, dtype=torch.bool).tril()
            attention_mask = causal & (doc[:, None] == doc[None, :])  # [L, L], True = may attend
    return loss_mask, position_ids, attention_mask


class GPTDataset(torch.utils.data.Dataset):
    """Samples of one split of one Megatron dataset (see the module docstring)."""

    def __init__(self, indexed: IndexedDataset, prefix: str, indices: np.ndarray, num_samples: int | None,
                 split: str, cfg: GPTDatasetConfig):
        self.dataset, self.prefix, self.indices = indexed, prefix, indices
        self.num_samples, self.split, self.cfg = num_samples, split, cfg
        self.description = self._description()
        self.document_index, self.sample_index, self.shuffle_index = _cached(
            cfg, prefix, f"GPTDataset-{split}", self.description,
            ("document_index", "sample_index", "shuffle_index"), self._build_indices)

    def _description(self) -> str:
        ipath = idx_path(self.prefix)
        st = os.stat(ipath)
        c = self.cfg
        return json.dumps({
            "class": "GPTDataset", "dataset_path": os.path.abspath(self.prefix), "idx_size": st.st_size,
            "idx_mtime_ns": st.st_mtime_ns, "num_samples": self.num_samples, "index_split": self.split,
            "split_range": [int(self.indices[0]) if len(self.indices) else 0, len(self.indices)],
            "random_seed": c.seed, "sequence_length": c.seq_length, "split": c.split,
            "drop_last_partial_validation_sequence": c.drop_last_partial_validation_sequence,
        }, indent=4)

    def _build_indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        L = self.cfg.seq_length
        sizes = self.dataset.sequence_lengths
        tokens_per_epoch = int(np.sum(sizes[self.indices]))
        if tokens_per_epoch < 2:
            raise UserError(f"{self.prefix}: the {self.split} split ({len(self.indices)} of {len(self.dataset)} "
                            f"sequences) has {tokens_per_epoch} tokens, nothing to sample; change split {self.cfg.split!r}")
        epochs = num_epochs_for(tokens_per_epoch, self.num_samples, L)
        separate_final_epoch = False
        if epochs > 1:
            sans_final = ((epochs - 1) * tokens_per_epoch - 1) // L
            from_final = self.num_samples - sans_final
            per_epoch = (tokens_per_epoch - 1) // L
            separate_final_epoch = from_final < int(0.80 * per_epoch)
        rng = np.random.RandomState(self.cfg.seed)
        document_index = build_document_index(self.indices, epochs, rng, separate_final_epoch)
        drop_last = self.split != "valid" or self.cfg.drop_last_partial_validation_sequence
        sample_index = build_sample_index(sizes, document_index, L, epochs, tokens_per_epoch, drop_last)
        n = sample_index.shape[0] - 1
        shuffle_index = build_shuffle_index(sans_final if separate_final_epoch else n, n, rng)
        return document_index, sample_index, shuffle_index

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def text(self, idx: int) -> np.ndarray:
        """The seq_length + 1 token ids of sample idx (int64), padded with pad_id if partial."""
        j = int(self.shuffle_index[idx])
        d0, o0 = (int(x) for x in self.sample_index[j])
        d1, o1 = (int(x) for x in self.sample_index[j + 1])
        get, doc = self.dataset.get, self.document_index
        if d0 == d1:
            parts = [get(int(doc[d0]), o0, o1 - o0 + 1)]
        else:
            parts = [get(int(doc[d0]), o0)]
            parts += [get(int(doc[d])) for d in range(d0 + 1, d1)]
            parts.append(get(int(doc[d1]), 0, o1 + 1))
        text = np.concatenate(parts).astype(np.int64)
        need = self.cfg.seq_length + 1
        if len(text) < need:
            text = np.concatenate([text, np.full(need - len(text), self.cfg.pad_id, np.int64)])
        return text

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        text = torch.from_numpy(self.text(idx))
        tokens, labels = text[:-1].clone(), text[1:].clone()
        loss_mask, position_ids, attention_mask = _ltor_masks(tokens, self.cfg)
        pad = self.cfg.pad_id
        loss_mask[labels == pad] = 0.0
        tokens[tokens == pad] = 0  # padded positions must still be valid embedding ids
        labels[labels == pad] = 0
        item = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
        if attention_mask is not None:
            item["attention_mask"] = attention_mask
        return item


# ---------------------------------------------------------------------------------------------
# caching


def _cache_dir(cfg: GPTDatasetConfig, prefix: str) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(prefix).resolve().parent / "cache" / "GPTDataset_indices"


def _cached(cfg: GPTDatasetConfig, prefix: str, kind: str, description: str, names: tuple[str, ...], build):
    """Load `names` arrays from the cache (keyed by md5(description)) or build and save them.
    Files are written under temporary names and renamed; an unwritable cache just logs a warning."""
    digest = hashlib.md5(description.encode("utf-8")).hexdigest()
    d = _cache_dir(cfg, prefix)
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


# ---------------------------------------------------------------------------------------------
# builder (BlendedMegatronDatasetBuilder)


def _split_datasets(prefix: str, cfg: GPTDatasetConfig, sizes: Sequence[int | None]) -> list[GPTDataset | None]:
    indexed = IndexedDataset(prefix)
    n = len(indexed)
    out: list[GPTDataset | None] = []
    for i, bookend in enumerate(split_bookends(cfg.split)):
        if bookend is None:
            out.append(None)
            continue
        beg, end = int(round(bookend[0] * float(n))), int(round(bookend[1] * float(n)))
        indices = np.arange(beg, end, dtype=np.int32)
        out.append(GPTDataset(indexed, prefix, indices, sizes[i], SPLITS[i], cfg))
    return out


def build_gpt_datasets(cfg: GPTDatasetConfig, num_samples: Sequence[int | None] = (None, None, None)):
    """-> (train, valid, test) datasets (None where the split is empty), Megatron-identical.

    With torch.distributed initialised, rank 0 builds (and caches) the indices first, the other
    ranks wait at a barrier and then load them."""
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and dist.get_rank() != 0:
        dist.barrier()
    try:
        return _build(cfg, list(num_samples) + [None] * (3 - len(num_samples)))
    finally:
        if distributed and dist.get_rank() == 0:
            dist.barrier()


def _build(cfg: GPTDatasetConfig, sizes: list[int | None]):
    from dsv3.data.blended import normalize, size_per_dataset

    prefixes, weights = parse_data_path(cfg.data_path)
    if len(prefixes) == 1 and weights is None:
        return tuple(_split_datasets(prefixes[0], cfg, sizes))
    bookends = split_bookends(cfg.split)
    if weights is not None:
        weights = normalize(weights)
        for i, b in enumerate(bookends):
            if b is not None and sizes[i] is None:
                raise UserError(f"data_path has weights, so the number of {SPLITS[i]} samples must be given")
        per_ds = [[None if s is None else size_per_dataset(weights, s, cfg.surplus)[j] for s in sizes]
                  for j in range(len(prefixes))]
    else:
        per_ds = [[None] * 3 for _ in prefixes]
    components = [_split_datasets(p, cfg, per_ds[j]) for j, p in enumerate(prefixes)]
    out = []
    for i, b in enumerate(bookends):
        if b is None:
            out.append(None)
            continue
        parts = [components[j][i] for j in range(len(prefixes))]
        if weights is not None:
            w, size = weights, sum(size_per_dataset(weights, sizes[i]))
        else:
            w = [len(p) for p in parts]
            size = None if sizes[i] is None else min(sizes[i], sum(w))
        out.append(_blend(cfg, parts, w, size, SPLITS[i]))
    return tuple(out)


def _blend(cfg, parts, weights, size, split):
    from dsv3.data.blended import BlendedDataset, build_blending_indices, build_exhaustive_blending_indices, normalize

    wn = normalize(weights) if size is not None else list(weights)
    description = json.dumps({"class": "BlendedDataset", "datasets": [json.loads(p.description) for p in parts],
                              "split": split, "weights": wn, "size": size}, indent=4)

    def build():
        if size is not None:
            return build_blending_indices(wn, size)
        return build_exhaustive_blending_indices([int(x) for x in weights])

    di, dsi = _cached(cfg, parts[0].prefix, f"BlendedDataset-{split}", description,
                      ("dataset_index", "dataset_sample_index"), build)
    return BlendedDataset(parts, weights, size, np.asarray(di), np.asarray(dsi))


def config_from_dict(d: dict) -> GPTDatasetConfig:
    """Strict construction from a mapping (unknown keys are an error)."""
    known = {f for f in GPTDatasetConfig.__dataclass_fields__}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"unknown dataset config key(s) {unknown}; expected some of {sorted(known)}")
    return GPTDatasetConfig(**d)

