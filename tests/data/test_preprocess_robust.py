"""`dsv3 preprocess` on hostile input (issue 10 item 8): long documents are tokenised in bounded
pieces with the same ids, JSON lines are streamed, a truncated .xz and a lone surrogate give one
line naming file and line, SIGTERM removes the temp files and a later run removes those of dead runs."""

from __future__ import annotations

import json
import lzma
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from dsv3.cli import main
from dsv3.data import preprocess_io
from dsv3.data.indexed_dataset import IndexedDataset
from dsv3.data.preprocess import preprocess


def _one_line_error(capsys, *argv) -> str:
    rc = main(["preprocess", *argv, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err, err
    return err


def test_split_long_cuts_before_single_spaces_within_the_bound():
    text = "alpha beta  gamma\ndelta " + "x" * 30 + " omega"

    def allowed(i):
        return text[i] == " " and not text[i - 1].isspace() and not text[i + 1].isspace()

    for n in (5, 8, 13, 40):
        pieces = preprocess_io.split_long(text, n)
        assert "".join(pieces) == text and all(len(p) <= n for p in pieces)
        start = 0
        for p in pieces[:-1]:  # each cut: the last allowed space in its window, else a hard cut at the bound
            cut = start + len(p)
            window = [i for i in range(start + 1, start + n + 1) if allowed(i)]
            assert cut == (window[-1] if window else start + n), (n, pieces)
            start = cut
    assert preprocess_io.split_long("short", 5) == ["short"]


def test_long_documents_are_tokenised_in_bounded_pieces_with_identical_ids(tmp_path, data_dir, tokenizer_json,
                                                                            raw_tokenizer, monkeypatch):
    """A 200k-character document and normal ones: the tokenizer never sees more than --max-doc-chars
    characters at once, and the .bin/.idx are byte-identical to an unsplit run and to plain encode."""
    wiki = (data_dir / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    long_doc = wiki[:200_000]
    docs = ["A normal document.", long_doc, "Another one, short."]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    seen = []
    real = preprocess_io.iter_pieces
    monkeypatch.setattr(preprocess_io, "iter_pieces", lambda t, n: seen.extend(map(len, real(t, n))) or real(t, n))
    split = preprocess(src, str(tmp_path / "split"), str(tokenizer_json), mode="document", max_doc_chars=4096, progress=False)
    assert seen and max(seen) <= 4096 and len(seen) >= 200_000 // 4096
    whole = preprocess(src, str(tmp_path / "whole"), str(tokenizer_json), mode="document", max_doc_chars=10**9, progress=False)
    for ext in (".bin", ".idx"):
        a, b = split.prefixes["text"] + ext, whole.prefixes["text"] + ext
        assert open(a, "rb").read() == open(b, "rb").read()
    ds = IndexedDataset(split.prefixes["text"])
    for i, d in enumerate(docs):
        assert ds[i][1:].tolist() == raw_tokenizer.encode(d, add_special_tokens=False).ids  # [0] is BOS


def test_jsonl_is_streamed(tmp_path):
    """Lines come one at a time: an unreadable line late in the file is not reached before the first."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "first"}\n' * 3 + b"\xff\n")
    from dsv3.data.preprocess import read_documents

    items = read_documents(src, "jsonl")
    assert next(items) == (1, '{"text": "first"}')
    with pytest.raises(Exception, match="line 4"):
        list(items)


@pytest.mark.parametrize("name", ["in.jsonl.xz", "wiki.train.tokens.xz"])
def test_truncated_xz_is_one_line(tmp_path, tokenizer_json, capsys, name):
    body = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(3000))
    blob = lzma.compress(body.encode() if name.startswith("in") else body.replace('{"text": ', " ").encode())
    (tmp_path / name).write_bytes(blob[: len(blob) // 2])
    err = _one_line_error(capsys, "--input", str(tmp_path / name), "--output-prefix", str(tmp_path / "o"),
                          "--vocab-file", str(tokenizer_json), "--seq-length", "8")
    assert name in err and "truncated or corrupt .xz" in err
    if name.startswith("in"):
        assert "after line" in err
    assert not list(tmp_path.glob("o_*")) and not list(tmp_path.glob(".o_*"))


def test_lone_surrogate_is_one_line(tmp_path, tokenizer_json, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n', encoding="utf-8")
    err = _one_line_error(capsys, "--input", str(src), "--output-prefix", str(tmp_path / "o"),
                          "--vocab-file", str(tokenizer_json), "--seq-length", "2")
    assert "in.jsonl: line 2: field 'text' holds a lone surrogate \\ud800 at character 4" in err
    assert not list(tmp_path.glob("o_*")) and not list(tmp_path.glob(".o_*"))


def test_sigterm_removes_temp_files(tmp_path, preprocess_midway):
    proc = preprocess_midway(workers=2)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert list(tmp_path.glob("*wiki_text_document*")) == []


def test_stale_temp_files_of_dead_runs_are_removed(tmp_path, tokenizer_json):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [f".o_text_document.tmp-{pid}{ext}" for pid in (dead.pid, alive.pid) for ext in (".bin", ".idx")]
        for n in names:
            (tmp_path / n).write_bytes(b"junk")
        src = tmp_path / "in.jsonl"
        src.write_text('{"text": "some words to tokenise here"}\n')
        preprocess(src, str(tmp_path / "o"), str(tokenizer_json), seq_length=2, progress=False)
        left = sorted(p.name for p in tmp_path.glob(".o_*"))
        assert left == sorted(names[2:])  # the live process's files are kept
    finally:
        alive.kill()
        alive.wait()
    assert np.asarray(IndexedDataset(tmp_path / "o_text_document").sequence_lengths).sum() > 0


def _peak_rss_mb(src, out, tokenizer_json) -> float:
    """Peak RSS (MB) of `python -m dsv3 preprocess` on `src`, as its parent sees it (RUSAGE_CHILDREN)."""
    probe = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "dsv3", "preprocess", "--input", str(src),
                        "--output-prefix", str(out), "--vocab-file", str(tokenizer_json), "--seq-length", "64",
                        "--no-progress"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1]) / 1024


@pytest.mark.slow
def test_peak_memory_is_a_small_multiple_of_the_longest_line(tmp_path, data_dir, tokenizer_json):
    """One 12 MB line costs a few bytes per character above a run whose line is one 100k-character
    piece (the tokenizer's working set for a piece is in both; below ~5 MB the peak is loading the
    tokenizer): ~5 bytes, where Python lists of ids cost ~15 (100 MB line: 1.70 GB -> 0.67 GB)."""
    wiki = " ".join((data_dir / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8").split())
    mb = 12
    for name, n in (("piece", 100_000), ("long", mb * 1_000_000)):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": (wiki * (n // len(wiki) + 1))[:n]}) + "\n")
    base = _peak_rss_mb(tmp_path / "piece.jsonl", tmp_path / "p", tokenizer_json)
    long = _peak_rss_mb(tmp_path / "long.jsonl", tmp_path / "l", tokenizer_json)
    assert (long - base) / mb < 9, (base, long)
