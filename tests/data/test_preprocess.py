"""`dsv3 preprocess`: exact ids vs the `tokenizers` library, the three modes, JSON lines,
megatron-core reads the result, bad input gives one line, a killed run leaves nothing."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from dsv3.cli import main
from dsv3.data.indexed_dataset import IndexedDataset
from dsv3.data.preprocess import preprocess
from dsv3.data.wikitext import clean, wikitext_documents, wikitext_to_jsonl


@pytest.fixture
def wiki_slice(tmp_path, wikitext_lines):
    p = tmp_path / "wiki.train.tokens"
    p.write_text("".join(wikitext_lines), encoding="utf-8")
    return p


def test_wikitext_clean_golden():
    # " N " -> " 1 " runs after " . " -> ". ", so a sentence-final N stays (the seed's order)
    raw = " \n = Title = \n \n A 1 @,@ 000 @-@ year ( approx . ) \" quoted \" run , see : it 's N . \n \n = = Sub = = \n \n B . \n"
    assert clean(raw) == '\n= Title =\n\nA 1,000-year (approx.) "quoted" run, see: it\'s N.\n\n== Sub ==\n\nB.\n'
    assert list(wikitext_documents(raw)) == ["A 1,000-year (approx.) \"quoted\" run, see: it's N.", "B.\n"]


def test_wikitext_jsonl_route_gives_same_dataset(tmp_path, wiki_slice, tokenizer_json):
    """wiki.train.tokens -> paragraph JSON lines (the seed's intermediate file) -> same .bin/.idx."""
    n = wikitext_to_jsonl(wiki_slice, tmp_path / "wiki.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "wiki.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == n and rows[0]["id"] == "0" and rows[1]["text"] == list(wikitext_documents(
        wiki_slice.read_text(encoding="utf-8")))[1]
    a = preprocess(wiki_slice, str(tmp_path / "a"), str(tokenizer_json), seq_length=128, progress=False)
    b = preprocess(tmp_path / "wiki.jsonl", str(tmp_path / "b"), str(tokenizer_json), seq_length=128, progress=False)
    for ext in (".bin", ".idx"):
        assert open(a.prefixes["text"] + ext, "rb").read() == open(b.prefixes["text"] + ext, "rb").read()


def test_document_mode_exact_tokenizers_ids(tmp_path, wiki_slice, tokenizer_json, raw_tokenizer):
    docs = list(wikitext_documents(wiki_slice.read_text(encoding="utf-8")))
    assert len(docs) > 50
    r = preprocess(wiki_slice, str(tmp_path / "w"), str(tokenizer_json), mode="document", add_bos=False,
                   workers=2, chunk_size=8, progress=False)
    ds = IndexedDataset(r.prefixes["text"])
    want = [e.ids for e in raw_tokenizer.encode_batch(docs, add_special_tokens=False)]
    assert [ds[i].tolist() for i in range(len(ds))] == want
    assert ds.document_indices.tolist() == list(range(len(want) + 1))
    assert ds.dtype == np.int32


def test_stitch_and_pad_modes(tmp_path, wiki_slice, tokenizer_json, raw_tokenizer):
    docs = list(wikitext_documents(wiki_slice.read_text(encoding="utf-8")))
    ids = [[0, *e.ids, 1] for e in raw_tokenizer.encode_batch(docs, add_special_tokens=False)]  # BOS .. EOD
    L = 512
    # the seed's command shape, through the CLI
    rc = main(["preprocess", "--input", str(wiki_slice), "--output-prefix", str(tmp_path / "s"),
               "--vocab-file", str(tokenizer_json), "--seq-length", str(L), "--append-eod", "--workers", "1"])
    assert rc == 0
    flat = [t for d in ids for t in d]
    n = len(flat) // (L + 1)
    ds = IndexedDataset(tmp_path / "s_text_document")
    assert len(ds) == n == ds.num_documents
    assert np.array_equal(np.concatenate([ds[i] for i in range(n)]), np.array(flat[: n * (L + 1)]))
    r = preprocess(wiki_slice, str(tmp_path / "p"), str(tokenizer_json), seq_length=L, mode="pad",
                   append_eod=True, progress=False, pad_id=2)
    pd = IndexedDataset(r.prefixes["text"])
    assert len(pd) == len(ids)
    for i, d in enumerate(ids):
        assert pd[i].tolist() == (d[: L + 1] + [2] * (L + 1 - len(d)))


def test_jsonl_keys_read_by_megatron(tmp_path, tokenizer_json, raw_tokenizer):
    mcore_idx = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    rows = [{"text": "Hello world", "title": "One"}, {"text": "", "title": "Empty text"},
            {"text": "中文 and 😀", "title": "Three"}]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    r = preprocess(src, str(tmp_path / "j"), str(tokenizer_json), mode="document", json_keys=["text", "title"],
                   append_eod=True, progress=False)
    assert set(r.prefixes) == {"text", "title"}
    for key in ("text", "title"):
        m = mcore_idx.IndexedDataset(str(tmp_path / f"j_{key}_document"))
        want = [[0, *raw_tokenizer.encode(row[key], add_special_tokens=False).ids, 1] for row in rows if row[key]]
        assert [m[i].tolist() for i in range(len(m))] == want


@pytest.mark.parametrize("case", ["missing", "empty", "not_utf8", "vocab", "bad_json", "missing_key", "too_short"])
def test_bad_input_one_line(tmp_path, tokenizer_json, capsys, case):
    src = tmp_path / ("in.jsonl" if case in ("bad_json", "missing_key") else "wiki.train.tokens")
    extra: list[str] = []
    if case == "empty":
        src.write_text("  \n\n")
    elif case == "not_utf8":
        src.write_bytes(b" \n Good line . \n \n Bad \xff byte . \n")
    elif case == "bad_json":
        src.write_text('{"text": "a"}\n{"text": \n')
    elif case == "missing_key":
        src.write_text('{"body": "a"}\n')
    elif case == "vocab":
        src.write_text(" Some text . \n")
        extra = ["--vocab-size", "32000"]
    elif case == "too_short":
        src.write_text(" Some text . \n")
    rc = main(["preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "o"), "--vocab-file",
               str(tokenizer_json), "--seq-length", "64", "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("dsv3 preprocess: error: ")
    expect = {"missing": "not found", "empty": "empty", "not_utf8": "not valid UTF-8 (byte 0xff on line 4)",
              "vocab": "128815 ids but the model vocab_size is 32000", "bad_json": "line 2 is not valid JSON",
              "missing_key": "line 1 has no string field 'text'", "too_short": "fewer than seq_length+1"}[case]
    assert expect in err
    named = tokenizer_json.name if case == "vocab" else src.name
    assert named in err
    assert not list(tmp_path.glob("o_*")) and not list(tmp_path.glob(".o_*"))


def test_killed_midway_leaves_no_output(tmp_path, preprocess_midway):
    proc = preprocess_midway()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert list(tmp_path.glob("wiki_text_document*")) == []
