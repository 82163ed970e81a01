"""Megatron's indexed dataset (`MMIDIDX` v1): `PREFIX.bin` token ids + `PREFIX.idx` index.

Byte layout (`spec/training.md` §a.1-a.2; little-endian, no padding anywhere):

    .idx  b"MMIDIDX\\x00\\x00" | <Q version=1 | <B dtype code | <Q S (sequences) | <Q D1 (len of document_indices)
          | int32[S] sequence_lengths | int64[S] sequence_pointers (byte offsets into .bin)
          | int64[D1] document_indices ([0, end of doc 0, ...], values are sequence indices, last == S)
    .bin  every sequence's ids concatenated in the index's dtype

Files written here are read by megatron-core unchanged, and files its builder writes are read here
(tests/data/test_indexed_dataset.py checks both directions).
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dsv3.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + S 8 + D1 8

# Megatron's DType enum: code <-> numpy dtype.
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int | None) -> type[np.number]:
    """Megatron's `DType.optimal_dtype`: uint16 when ids fit (vocab < 65500), else int32.
    DeepSeek-V3's 129,280-entry vocab -> int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


def write_index(path: str | os.PathLike, dtype, sequence_lengths: Sequence[int] | np.ndarray,
                document_indices: Sequence[int] | np.ndarray) -> None:
    """Write a `.idx` file for sequences stored back to back in a `.bin` of `dtype`."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    docs = np.asarray(document_indices, dtype=np.int64)
    # pointer[i] = sum_{j<i} length[j] * itemsize, computed in int64 (sequences can exceed 2 GiB in total)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODE_OF[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(docs)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(docs.tobytes(order="C"))


class IndexedDatasetBuilder:
    """Writes a `.bin` while collecting the index; `finalize(idx_path)` writes the `.idx`.

    Same semantics as Megatron's builder: `add_item` appends one sequence, `end_document` closes a
    document; `add_document(ids, lengths)` does both for a document of `len(lengths)` sequences;
    `add_index(prefix)` appends a whole existing dataset (used to merge worker partitions).
    """

    def __init__(self, bin_path: str | os.PathLike, dtype=np.int32):
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self._bin = open(bin_path, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]

    def add_item(self, tokens) -> None:
        arr = _as_array(tokens, self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self.sequence_lengths.append(int(arr.size))

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens, lengths: Iterable[int]) -> None:
        arr = _as_array(tokens, self.dtype)
        lengths = [int(n) for n in lengths]
        if sum(lengths) != arr.size:
            raise ValueError(f"document lengths sum to {sum(lengths)} but it has {arr.size} tokens")
        self._bin.write(arr.tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def add_index(self, prefix: str | os.PathLike) -> None:
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise UserError(f"{idx_path(prefix)}: token dtype {other.dtype} differs from the builder's {self.dtype}")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(other.sequence_lengths.tolist())
        self.document_indices.extend((offset + other.document_indices[1:]).tolist())
        del other  # release the memory maps before copying
        with open(bin_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin)

    def finalize(self, idx_path: str | os.PathLike) -> None:
        self._bin.close()
        write_index(idx_path, self.dtype, self.sequence_lengths, self.document_indices)


def _as_array(tokens, dtype: np.dtype) -> np.ndarray:
    if hasattr(tokens, "numpy"):  # torch tensor
        tokens = tokens.numpy()
    return np.asarray(tokens, dtype=dtype).reshape(-1)


class IndexedDataset:
    """Memory-mapped reader. `ds[i]` is sequence i (a numpy array); `ds.get(i, offset, length)`
    reads part of it. Corrupt files raise a one-line UserError naming the file."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not os.path.isfile(p):
                raise UserError(f"{p}: file not found (expected the Megatron dataset PREFIX.bin + PREFIX.idx)")
        size = os.path.getsize(ipath)
        with open(ipath, "rb") as f:
            header = f.read(HEADER_BYTES)
        if len(header) < len(MAGIC) or header[: len(MAGIC)] != MAGIC:
            raise UserError(f"{ipath}: not a Megatron index file (wrong magic, expected MMIDIDX)")
        if len(header) < HEADER_BYTES:
            raise UserError(f"{ipath}: truncated index ({size} bytes, header needs {HEADER_BYTES})")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise UserError(f"{ipath}: unsupported index version {version} (expected {VERSION})")
        code = header[17]
        if code not in DTYPE_CODES:
            raise UserError(f"{ipath}: unknown token dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        if self.dtype.kind not in "iu":
            raise UserError(f"{ipath}: token dtype code {code} is {self.dtype}, not an integer type (token ids are integers)")
        n_seq, n_doc1 = struct.unpack("<QQ", header[18:34])
        need = HEADER_BYTES + 12 * n_seq + 8 * n_doc1
        if size < need:
            raise UserError(f"{ipath}: truncated index ({size} bytes, header says {n_seq} sequences "
                            f"and {n_doc1 - 1} documents -> {need} bytes)")
        # Text datasets end here; multimodal ones append int8 sequence modes, which we ignore.
        self._idx = np.memmap(ipath, dtype=np.uint8, mode="r")
        buf = self._idx
        self.sequence_lengths = np.frombuffer(buf, np.int32, n_seq, HEADER_BYTES)
        self.sequence_pointers = np.frombuffer(buf, np.int64, n_seq, HEADER_BYTES + 4 * n_seq)
        self.document_indices = np.frombuffer(buf, np.int64, n_doc1, HEADER_BYTES + 12 * n_seq)
        if n_doc1 == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != n_seq:
            raise UserError(f"{ipath}: corrupt index (document_indices must run from 0 to {n_seq})")
        end = self._check_index(ipath)
        bin_size = os.path.getsize(bpath)
        if bin_size < end:
            raise UserError(f"{bpath}: shorter than its index says ({bin_size} bytes, index needs {end})")
        if bin_size > end:
            raise UserError(f"{bpath}: larger than its index says ({bin_size} bytes, index covers {end}): "
                            f"a different .idx, or a wrong dtype in it?")
        # np.memmap cannot map an empty file; an empty dataset needs no data anyway.
        self._bin = np.memmap(bpath, dtype=np.uint8, mode="r") if bin_size else np.zeros(0, np.uint8)

    def _check_index(self, ipath: str) -> int:
        """Lengths >= 0, sequences back to back from byte 0 (pointer[i+1] = pointer[i] + length[i] *
        itemsize, as every Megatron writer lays them out), document boundaries non-decreasing.
        Vectorised over the index arrays. Returns the number of .bin bytes the index covers."""
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        if len(lengths) and int(lengths.min()) < 0:
            i = int(np.argmin(lengths))
            raise UserError(f"{ipath}: corrupt index (sequence {i} has length {int(lengths[i])})")
        ends = np.cumsum(lengths.astype(np.int64)) * self.dtype.itemsize
        starts = np.concatenate([np.zeros(1, np.int64), ends[:-1]])
        bad = np.flatnonzero(pointers != starts)
        if len(bad):
            i = int(bad[0])
            raise UserError(f"{ipath}: corrupt index (sequence {i} starts at byte {int(pointers[i])}, "
                            f"the lengths before it put it at {int(starts[i])})")
        if len(docs) > 1 and bool((np.diff(docs) < 0).any()):
            raise UserError(f"{ipath}: corrupt index (document_indices decrease)")
        return int(ends[-1]) if len(ends) else 0

    def check_token_ids(self, vocab_size: int, chunk_tokens: int = 1 << 24) -> None:
        """UserError unless every token id is in [0, vocab_size). Vectorised: numpy min/max over the
        memory-mapped .bin in chunks of `chunk_tokens` (bounded memory, disk speed on multi-GB files);
        skipped when the dtype cannot hold an id outside the vocabulary."""
        info = np.iinfo(self.dtype)
        if info.min >= 0 and info.max < vocab_size:
            return
        data = np.frombuffer(self._bin, self.dtype, len(self._bin) // self.dtype.itemsize)
        for start in range(0, len(data), chunk_tokens):
            part = data[start : start + chunk_tokens]
            if int(part.min()) >= 0 and int(part.max()) < vocab_size:
                continue
            pos = start + int(np.argmax((part < 0) | (part >= vocab_size)))
            raise UserError(f"{bin_path(self.prefix)}: token id {int(data[pos])} (token {pos}) is outside the model's "
                            f"vocabulary [0, {vocab_size}): preprocessed with another tokenizer or --vocab-size, or corrupt?")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `[offset, offset+length)` of sequence i (to its end when length is None)."""
        n = int(self.sequence_lengths[i])
        if length is None:
            length = n - offset
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, start)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        return self.get(i)

    def document(self, d: int) -> np.ndarray:
        """All tokens of document d (its sequences concatenated)."""
        s0, s1 = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if s1 == s0:
            return np.zeros(0, self.dtype)
        start = int(self.sequence_pointers[s0])
        count = int(self.sequence_lengths[s0:s1].sum())
        return np.frombuffer(self._bin, self.dtype, count, start)


def exists(prefix: str | os.PathLike) -> bool:
    return Path(idx_path(prefix)).is_file() and Path(bin_path(prefix)).is_file()
