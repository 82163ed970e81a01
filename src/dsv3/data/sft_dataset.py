"""SFT samples -> fixed-length training sequences, packed or padded (`data.sft.packing`).

A sample of n ids (`dsv3.data.sft`) gives n - 1 positions: tokens ids[:-1], labels ids[1:],
loss_mask mask[1:] (the reply tokens and their EOS are predicted, nothing else).

* padding: one sample per sequence, padded to seq_length (pad positions have loss_mask 0; causal
  attention never lets a real token see them).
* packing: consecutive samples (in the shuffled order) are concatenated while they fit (next-fit),
  the tail padded. Every sample gets position ids restarting at 0 and a document id (`doc_ids`);
  the loss turns `doc_ids` into a block-diagonal causal mask so no token attends across samples and
  MTP targets never cross a sample boundary: a packed sequence trains exactly like its samples run
  one by one (tested).

Too long (n - 1 > seq_length): `truncate` keeps the first seq_length + 1 ids (a sample left with no
reply token is dropped); `drop` discards it. The counts are logged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dsv3.errors import UserError


@dataclass
class PackStats:
    samples: int = 0
    sequences: int = 0
    truncated: int = 0
    dropped: int = 0
    trained_tokens: int = 0

    def line(self, name: str, seq_length: int, packing: bool, overlong: str) -> str:
        rule = ("longer samples truncated to seq_length+1 ids, dropped if no reply token is left" if overlong == "truncate"
                else "longer samples dropped")
        return (f"SFT {name}: {self.samples} samples -> {self.sequences} sequences of {seq_length} tokens "
                f"({'packed' if packing else 'padded'}); {self.truncated} truncated, {self.dropped} dropped ({rule}); "
                f"{self.trained_tokens} trained tokens")


def split_indices(n: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic held-out split of n samples: (train, valid) index arrays (valid >= 1 when fraction > 0)."""
    order = np.random.default_rng(seed).permutation(n)
    k = 0 if valid_fraction <= 0 else max(1, int(round(valid_fraction * n)))
    if k >= n:
        raise UserError(f"data.sft.valid_fraction {valid_fraction} leaves no training sample of {n}")
    return np.sort(order[k:]), np.sort(order[:k])


def plan(samples, indices: np.ndarray, seq_length: int, packing: bool, overlong: str) -> tuple[list[list[tuple[int, int]]], PackStats]:
    """Sequences as lists of (sample index, ids used), in the order of `indices`."""
    if overlong not in ("truncate", "drop"):
        raise UserError(f"data.sft.overlong {overlong!r}: expected truncate or drop")
    L = seq_length
    st = PackStats(samples=len(indices))
    packs: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    used = 0
    for i in indices:
        i = int(i)
        n = len(samples.ids(i))
        use = n
        if n - 1 > L:
            if overlong == "drop":
                st.dropped += 1
                continue
            use = L + 1
            st.truncated += 1
        trained = int(np.asarray(samples.mask(i)[1:use]).sum()) if use > 1 else 0
        if trained == 0:
            st.dropped += 1
            continue
        st.trained_tokens += trained
        if not packing or used + use - 1 > L:
            if cur:
                packs.append(cur)
            cur, used = [], 0
        cur.append((i, use))
        used += use - 1
    if cur:
        packs.append(cur)
    st.sequences = len(packs)
    return packs, st


class SFTDataset(torch.utils.data.Dataset):
    """Sequences of `seq_length` positions: tokens, labels, loss_mask, position_ids (+ doc_ids when packing)."""

    def __init__(self, samples, packs: list[list[tuple[int, int]]], seq_length: int, pad_id: int, packing: bool):
        self.samples, self.packs, self.L, self.pad_id, self.packing = samples, packs, seq_length, pad_id, packing

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        L = self.L
        tokens = np.full(L, self.pad_id, np.int64)
        labels = np.full(L, self.pad_id, np.int64)
        mask = np.zeros(L, np.float32)
        pos = np.zeros(L, np.int64)
        doc = np.zeros(L, np.int64)
        p = 0
        for j, (i, use) in enumerate(self.packs[k]):
            ids = np.asarray(self.samples.ids(i)[:use], np.int64)
            m = np.asarray(self.samples.mask(i)[:use], np.float32)
            n = use - 1
            tokens[p : p + n], labels[p : p + n], mask[p : p + n] = ids[:-1], ids[1:], m[1:]
            pos[p : p + n], doc[p : p + n] = np.arange(n), j
            p += n
        pos[p:] = np.arange(L - p)
        doc[p:] = len(self.packs[k])  # the padding tail is a document of its own
        out = {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
               "loss_mask": torch.from_numpy(mask), "position_ids": torch.from_numpy(pos)}
        if self.packing:
            out["doc_ids"] = torch.from_numpy(doc)
        return out


def build_sft_dataset(samples, indices, seq_length: int, pad_id: int, packing: bool, overlong: str, seed: int | None,
                      name: str, log=None) -> SFTDataset:
    """Shuffle `indices` (seed None: keep the order), plan the sequences, log one line of counts."""
    indices = np.asarray(indices)
    if seed is not None:
        indices = indices[np.random.default_rng(seed).permutation(len(indices))]
    packs, st = plan(samples, indices, seq_length, packing, overlong)
    if log is not None:
        log(st.line(name, seq_length, packing, overlong))
    return SFTDataset(samples, packs, seq_length, pad_id, packing)


def tokenizer_source(cfg) -> str | None:
    """data.tokenizer, else train.init_from's directory when it ships a tokenizer, else None (the default one)."""
    from pathlib import Path

    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    init = cfg.train.init_from
    if init and any((Path(init) / n).is_file() for n in ("tokenizer.json", "tokenizer.json.xz")):
        return init
    return None


def export_tokenizer(cfg, dest) -> list[str]:
    """Write tokenizer.json (decompressed) and tokenizer_config.json (with its chat template) of the run's
    tokenizer next to exported weights, so transformers and `dsv3 serve` find them. Returns the names written."""
    import lzma
    import shutil
    from pathlib import Path

    from dsv3.data.tokenizer import _resolve

    tok_file, cfg_file = _resolve(tokenizer_source(cfg))
    dest = Path(dest)
    if tok_file.suffix == ".xz":
        with lzma.open(tok_file, "rb") as src, open(dest / "tokenizer.json", "wb") as out:
            shutil.copyfileobj(src, out)
    else:
        shutil.copyfile(tok_file, dest / "tokenizer.json")
    written = ["tokenizer.json"]
    if cfg_file is not None:
        shutil.copyfile(cfg_file, dest / "tokenizer_config.json")
        written.append("tokenizer_config.json")
    return written


def build_sft_data(cfg, log=None) -> tuple[SFTDataset, SFTDataset | None]:
    """(train, held-out) SFT datasets of a RunConfig with `data.type: sft` (see `dsv3.config.train.SFTConfig`)."""
    from dsv3.data.sft import is_raw_file, load_sft_samples

    s, L = cfg.data.sft, cfg.data.seq_length
    raw = [p for p in (s.path, s.valid_path) if p and is_raw_file(p)]
    if raw:
        from dsv3.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_source(cfg))
    else:
        tok = None
    samples = load_sft_samples(s.path, tok, s.format)
    pad = cfg.model.eos_token_id
    seed = cfg.data.random_seed if s.shuffle else None
    if s.valid_path:
        train_idx, valid_samples = np.arange(len(samples)), load_sft_samples(s.valid_path, tok, s.format)
        valid_idx = np.arange(len(valid_samples))
    else:
        train_idx, valid_idx = split_indices(len(samples), s.valid_fraction, cfg.data.random_seed)
        valid_samples = samples
    train = build_sft_dataset(samples, train_idx, L, pad, s.packing, s.overlong, seed, f"train ({s.path})", log)
    if len(train) == 0:
        raise UserError(f"data.sft.path {s.path}: no training sample left (every sample dropped as too long or without a reply)")
    valid = None
    if len(valid_idx):
        valid = build_sft_dataset(valid_samples, valid_idx, L, pad, s.packing, s.overlong, None,
                                  f"held-out ({s.valid_path or f'{s.valid_fraction:g} of the samples'})", log)
    return train, valid if valid is not None and len(valid) else None
