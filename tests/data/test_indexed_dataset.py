"""Indexed dataset: byte-exact with megatron-core's MMIDIDX builder/reader in both directions."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from dsv3.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, optimal_dtype
from dsv3.errors import UserError

mcore_idx = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def _docs(rng, n_docs, vocab):
    # doc -> list of sequences; include a one-token sequence and an empty document
    docs = [[rng.integers(0, vocab, rng.integers(1, 40)).tolist() for _ in range(rng.integers(1, 4))]
            for _ in range(n_docs)]
    docs[1] = [[7]]
    docs.insert(3, [])
    return docs


def _write(builder_cls, prefix, docs, dtype, use_add_document):
    b = builder_cls(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        if use_add_document and doc:
            b.add_document(torch.tensor([t for s in doc for t in s]), [len(s) for s in doc])
        else:
            for s in doc:
                b.add_item(torch.tensor(s))
            b.end_document()
    b.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("vocab", [129280, 32000])
@pytest.mark.parametrize("use_add_document", [False, True])
def test_bytes_equal_megatron_and_cross_read(tmp_path, vocab, use_add_document):
    dtype = optimal_dtype(vocab)
    assert dtype == mcore_idx.DType.optimal_dtype(vocab)
    docs = _docs(np.random.default_rng(vocab), 12, vocab)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _write(IndexedDatasetBuilder, ours, docs, dtype, use_add_document)
    _write(mcore_idx.IndexedDatasetBuilder, theirs, docs, dtype, use_add_document)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()
    flat = [s for d in docs for s in d]
    k = next(i for i, s in enumerate(flat) if len(s) >= 3)
    # megatron reads ours, we read theirs
    m = mcore_idx.IndexedDataset(str(ours))
    assert [m[i].tolist() for i in range(len(m))] == flat
    assert m.get(k, offset=1, length=2).tolist() == flat[k][1:3]
    d = IndexedDataset(theirs)
    assert [d[i].tolist() for i in range(len(d))] == flat
    assert d.document_indices.tolist() == m.document_indices.tolist()
    assert d.sequence_lengths.tolist() == m.sequence_lengths.tolist()
    assert d.get(k, offset=1, length=2).tolist() == flat[k][1:3]
    assert d.dtype == np.dtype(dtype) and d.num_documents == len(docs)
    assert d.document(0).tolist() == [t for s in docs[0] for t in s]


def test_add_index_merge_equals_megatron(tmp_path):
    rng = np.random.default_rng(0)
    parts = []
    for k in range(3):
        p = tmp_path / f"part{k}"
        _write(IndexedDatasetBuilder, p, _docs(rng, 5, 1000), np.int32, False)
        parts.append(str(p))
    for name, cls in (("ours", IndexedDatasetBuilder), ("theirs", mcore_idx.IndexedDatasetBuilder)):
        b = cls(str(tmp_path / f"{name}.bin"), dtype=np.int32)
        for p in parts:
            b.add_index(p)
        b.finalize(str(tmp_path / f"{name}.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()


def test_corrupt_files_one_clear_error(tmp_path):
    p = tmp_path / "ds"
    _write(IndexedDatasetBuilder, p, [[[1, 2, 3], [4]], [[5, 6]]], np.int32, False)
    idx, bin_ = (tmp_path / "ds.idx").read_bytes(), (tmp_path / "ds.bin").read_bytes()
    cases = {
        "wrong magic": (b"XXIDIDX\x00\x00" + idx[9:], bin_),
        "truncated index": (idx[:-5], bin_),
        "truncated index ": (idx[:20], bin_),
        "shorter than its index": (idx, bin_[:-4]),
        "unsupported index version": (idx[:9] + (2).to_bytes(8, "little") + idx[17:], bin_),
    }
    for msg, (i, b) in cases.items():
        (tmp_path / "ds.idx").write_bytes(i)
        (tmp_path / "ds.bin").write_bytes(b)
        with pytest.raises(UserError, match=msg.strip()) as e:
            IndexedDataset(p)
        assert "\n" not in str(e.value) and ("ds.idx" in str(e.value) or "ds.bin" in str(e.value))
    (tmp_path / "ds.bin").unlink()
    with pytest.raises(UserError, match="ds.bin: file not found"):
        IndexedDataset(p)


def test_inconsistent_index_is_refused_when_opening(tmp_path):
    """Pointers, lengths, document boundaries, the .bin size and the dtype code are checked on open."""
    import struct

    p = tmp_path / "ds"
    _write(IndexedDatasetBuilder, p, [[[1, 2, 3], [4]], [[5, 6]]], np.int32, False)
    idx, bin_ = (tmp_path / "ds.idx").read_bytes(), (tmp_path / "ds.bin").read_bytes()
    S, H = 3, 34  # sequences, header bytes
    lengths_at, pointers_at, docs_at = H, H + 4 * S, H + 12 * S

    def put(buf, at, fmt, value):
        return buf[:at] + struct.pack(fmt, value) + buf[at + struct.calcsize(fmt):]

    cases = {
        "sequence 1 starts at byte 8, the lengths before it put it at 12": (put(idx, pointers_at + 8, "<q", 8), bin_),
        "sequence 2 has length -1": (put(idx, lengths_at + 8, "<i", -1), bin_),
        "document_indices decrease": (put(idx, docs_at + 8, "<q", 4), bin_),  # [0, 4, 3]
        "larger than its index says": (idx, bin_ + b"\0" * 8),
        "not an integer type": (idx[:17] + bytes([7]) + idx[18:], bin_),  # float32
        # a wrong integer dtype (int16 for int32 data): the pointers no longer match the lengths
        "sequence 1 starts at byte 12, the lengths before it put it at 6": (idx[:17] + bytes([3]) + idx[18:], bin_),
    }
    for msg, (i, b) in cases.items():
        (tmp_path / "ds.idx").write_bytes(i)
        (tmp_path / "ds.bin").write_bytes(b)
        with pytest.raises(UserError, match=re.escape(msg.strip())) as e:
            IndexedDataset(p)
        assert "\n" not in str(e.value) and ("ds.idx" in str(e.value) or "ds.bin" in str(e.value))


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.int64])
def test_token_ids_are_checked_against_the_vocabulary_in_chunks(tmp_path, dtype):
    p = tmp_path / "ds"
    ids = np.arange(100, dtype=np.int64) % 50
    _write(IndexedDatasetBuilder, p, [[ids[:60].tolist()], [ids[60:].tolist()]], dtype, True)
    ds = IndexedDataset(p)
    ds.check_token_ids(50, chunk_tokens=7)
    with pytest.raises(UserError, match=r"ds.bin: token id 49 \(token 49\) is outside the model's vocabulary \[0, 49\)"):
        ds.check_token_ids(49, chunk_tokens=7)  # found in the 8th chunk, position exact
    if np.dtype(dtype).kind == "i":  # a negative id in a signed dtype
        raw = bytearray((tmp_path / "ds.bin").read_bytes())
        item = np.dtype(dtype).itemsize
        raw[83 * item : 84 * item] = np.array([-5], dtype).tobytes()
        (tmp_path / "ds.bin").write_bytes(bytes(raw))
        with pytest.raises(UserError, match=r"token id -5 \(token 83\)"):
            IndexedDataset(p).check_token_ids(50, chunk_tokens=16)
