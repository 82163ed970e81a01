"""GPT dataset: indices and samples equal megatron-core's GPTDataset / BlendedDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsv3.data.gpt_dataset import GPTDatasetConfig, build_gpt_datasets
from dsv3.data.gpt_indices import build_sample_index, build_sample_index_reference, parse_data_path, split_bookends
from dsv3.data.indexed_dataset import IndexedDatasetBuilder

EOD = 1


def _make(prefix, seed, n_seq=120, max_len=50, vocab=500):
    """Random sequences, one per document, each ending in EOD (like `--append-eod` output)."""
    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(f"{prefix}.bin", np.int32)
    for _ in range(n_seq):
        n = int(rng.integers(1, max_len))
        b.add_document(np.concatenate([rng.integers(2, vocab, n - 1), [EOD]]) if n > 1 else [EOD], [n])
    b.finalize(f"{prefix}.idx")
    return str(prefix)


class _StubTokenizer:
    """What megatron-core's GPTDataset reads from a tokenizer (clients.md §4)."""

    eod = EOD
    pad = EOD  # DeepSeek's pad is EOS; megatron then falls back to pad id -1, as our default does
    vocab_size = 129280
    unique_identifiers = {"class": "Stub"}


def _megatron(tmp_path, cfg: GPTDatasetConfig, sizes):
    pytest.importorskip("megatron.core.datasets.gpt_dataset")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig as MConfig
    from megatron.core.datasets.utils import get_blend_from_list

    mcfg = MConfig(random_seed=cfg.seed, sequence_length=cfg.seq_length,
                   blend=get_blend_from_list([str(x) for x in cfg.data_path]), split=cfg.split,
                   tokenizer=_StubTokenizer(), reset_position_ids=cfg.reset_position_ids,
                   reset_attention_mask=cfg.reset_attention_mask, eod_mask_loss=cfg.eod_mask_loss,
                   path_to_cache=None)
    return BlendedMegatronDatasetBuilder(GPTDataset, list(sizes), lambda: True, mcfg).build()


def _assert_same(ours, theirs, n_check=None):
    if theirs is None:
        assert ours is None
        return
    assert ours is not None and len(ours) == len(theirs)
    if hasattr(theirs, "datasets"):  # blended
        assert np.array_equal(ours.dataset_index, theirs.dataset_index)
        assert np.array_equal(ours.dataset_sample_index, theirs.dataset_sample_index)
        for a, b in zip(ours.datasets, theirs.datasets):
            _assert_same_gpt(a, b)
    else:
        _assert_same_gpt(ours, theirs)
    idx = range(len(ours)) if n_check is None else np.linspace(0, len(ours) - 1, n_check).astype(int)
    for i in idx:
        a, b = ours[int(i)], theirs[int(i)]
        for k in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(a[k], b[k]), (i, k)
        assert a["tokens"].dtype == torch.int64 and a["loss_mask"].dtype == torch.float32
        if "attention_mask" in a:
            assert torch.equal(a["attention_mask"], ~b["attention_mask"][0])  # ours: True = may attend


def _assert_same_gpt(a, b):
    assert a.document_index.dtype == b.document_index.dtype and np.array_equal(a.document_index, b.document_index)
    assert a.sample_index.dtype == b.sample_index.dtype and np.array_equal(a.sample_index, b.sample_index)
    assert a.shuffle_index.dtype == b.shuffle_index.dtype and np.array_equal(a.shuffle_index, b.shuffle_index)


def test_multi_epoch_single_dataset(tmp_path):
    p = _make(tmp_path / "a", 0)
    from dsv3.data.indexed_dataset import IndexedDataset

    tpe = int(IndexedDataset(p).sequence_lengths.sum())
    per_epoch = (tpe - 1) // 32
    # three epochs each; the final epoch gives < 80% of an epoch (shuffled on its own) or nearly all of one
    for n in (2 * per_epoch + 3, 3 * per_epoch - 1):
        cfg = GPTDatasetConfig(seq_length=32, data_path=[p], split="1,0,0", cache_dir=str(tmp_path / "c"))
        ours = build_gpt_datasets(cfg, (n, 0, 0))
        theirs = _megatron(tmp_path, cfg, (n, 0, 0))
        assert ours[1] is None and ours[2] is None
        assert len(ours[0].document_index) == 3 * 120  # three epochs of 120 sequences
        _assert_same(ours[0], theirs[0])
    again = build_gpt_datasets(cfg, (n, 0, 0))[0]  # from the cache
    assert isinstance(again.sample_index, np.memmap)
    _assert_same(again, theirs[0], n_check=20)


def test_nontrivial_split_and_masks(tmp_path):
    p = _make(tmp_path / "a", 1, n_seq=2000)
    cfg = GPTDatasetConfig(seq_length=24, data_path=[p], split="949,50,1", reset_position_ids=True,
                           reset_attention_mask=True, eod_mask_loss=True, cache_dir=str(tmp_path / "c"), seed=7)
    sizes = (100, 30, 5)
    ours, theirs = build_gpt_datasets(cfg, sizes), _megatron(tmp_path, cfg, sizes)
    for a, b in zip(ours, theirs):
        _assert_same(a, b, n_check=80)
    item = ours[0][0]
    assert set(item) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}
    assert item["attention_mask"].shape == (24, 24) and item["attention_mask"].dtype == torch.bool


def test_blended_weights(tmp_path):
    p1, p2, p3 = _make(tmp_path / "a", 2), _make(tmp_path / "b", 3, n_seq=60), _make(tmp_path / "c", 4)
    cfg = GPTDatasetConfig(seq_length=16, data_path=[0.3, p1, "0.2", p2, 0.5, p3], split="90,10,0",
                           cache_dir=str(tmp_path / "cache"))
    sizes = (400, 40, 0)
    ours, theirs = build_gpt_datasets(cfg, sizes), _megatron(tmp_path, cfg, sizes)
    for a, b in zip(ours, theirs):
        _assert_same(a, b, n_check=60)
    assert "dataset_id" in ours[0][0]


def test_single_weighted_path_like_mindspore_yaml(tmp_path):
    """data_path: [1, prefix] (the seed yaml) builds a one-component blend, as in Megatron."""
    p = _make(tmp_path / "a", 5)
    cfg = GPTDatasetConfig(seq_length=32, data_path=[1, p], split="1, 0, 0", cache_dir=str(tmp_path / "c"))
    ours, theirs = build_gpt_datasets(cfg, (150, 0, 0)), _megatron(tmp_path, cfg, (150, 0, 0))
    _assert_same(ours[0], theirs[0])


@pytest.mark.parametrize("drop_last", [True, False])
def test_sample_index_fast_equals_reference(drop_last):
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 30, 200).astype(np.int32)  # includes empty sequences
    sizes[0] = 5
    doc_index = rng.permutation(np.tile(np.arange(200, dtype=np.int32), 3))
    tpe = int(sizes.sum())
    for L in (2, 7, 64, 1000):
        a = build_sample_index_reference(sizes, doc_index, L, 3, tpe, drop_last)
        b = build_sample_index(sizes, doc_index, L, 3, tpe, drop_last)
        assert a.dtype == b.dtype and np.array_equal(a, b), L


def test_parsing():
    assert split_bookends("1,0,0") == [(0.0, 1.0), None, None]
    assert split_bookends("949,50,1")[2] == pytest.approx((0.999, 1.0))
    assert parse_data_path(["1", "p"]) == (["p"], [1.0])
    assert parse_data_path(["p", "q"]) == (["p", "q"], None)
    assert parse_data_path(["p"]) == (["p"], None)
