"""Indexed dataset: byte-exact with megatron-core's MMIDIDX builder/reader in both directions."""

from __future__ import annotations

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
