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
The split parsing, the index arithmetic and that cache live in `dsv3.data.gpt_indices`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from dsv3.data.gpt_indices import (_cached, build_document_index, build_sample_index, build_shuffle_index, num_epochs_for,
                                   parse_data_path, split_bookends)
from dsv3.data.indexed_dataset import IndexedDataset, idx_path
from dsv3.errors import UserError

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
            cfg.cache_dir, prefix, f"GPTDataset-{split}", self.description,
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

    di, dsi = _cached(cfg.cache_dir, parts[0].prefix, f"BlendedDataset-{split}", description,
                      ("dataset_index", "dataset_sample_index"), build)
    return BlendedDataset(parts, weights, size, np.asarray(di), np.asarray(dsi))


def config_from_dict(d: dict) -> GPTDatasetConfig:
    """Strict construction from a mapping (unknown keys are an error)."""
    known = {f for f in GPTDatasetConfig.__dataclass_fields__}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"unknown dataset config key(s) {unknown}; expected some of {sorted(known)}")
    return GPTDatasetConfig(**d)
