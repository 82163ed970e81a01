"""Fixtures for the data tests: the shared DeepSeek-V3 tokenizer and WikiText-2 (skip when absent)."""

from __future__ import annotations

import functools
import lzma
from pathlib import Path

import pytest


@functools.lru_cache(maxsize=None)
def _load(path: str):
    from dsv3.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


@functools.lru_cache(maxsize=None)
def _wikitext_head(path: str, n: int) -> tuple[str, ...]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return tuple(next(f) for _ in range(n))


@pytest.fixture
def tokenizer_dir(data_dir) -> Path:
    return data_dir / "deepseek_v3_tokenizer"


@pytest.fixture
def tokenizer(tokenizer_dir):
    return _load(str(tokenizer_dir))


@pytest.fixture(scope="session")
def _tok_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tok")


@pytest.fixture
def tokenizer_json(tokenizer_dir, _tok_tmp) -> Path:
    """The tokenizer.json decompressed into a temp dir (never into the repo)."""
    out = _tok_tmp / "tokenizer.json"
    if not out.exists():
        with lzma.open(tokenizer_dir / "tokenizer.json.xz", "rb") as f:
            out.write_bytes(f.read())
    return out


@pytest.fixture
def wikitext_lines(data_dir) -> list[str]:
    """The first 2000 lines of wiki.train.tokens: a small real slice."""
    return list(_wikitext_head(str(data_dir / "wikitext-2" / "wiki.train.tokens.xz"), 2000))


@pytest.fixture
def raw_tokenizer(tokenizer_json):
    """The `tokenizers` library on the same tokenizer.json, without any dsv3 code."""
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(tokenizer_json))


@pytest.fixture
def preprocess_midway(tmp_path, data_dir, tokenizer_json):
    """start(workers) -> a `dsv3 preprocess` subprocess on wiki.train.tokens (prefix tmp_path/wiki),
    returned once its hidden temporary .bin holds data, i.e. midway. Killed at teardown if still alive."""
    import subprocess
    import sys
    import time

    procs = []

    def start(workers: int = 1):
        cmd = [sys.executable, "-m", "dsv3", "preprocess", "--input", str(data_dir / "wikitext-2" / "wiki.train.tokens.xz"),
               "--output-prefix", str(tmp_path / "wiki"), "--vocab-file", str(tokenizer_json), "--seq-length", "128",
               "--mode", "document", "--workers", str(workers), "--chunk-size", "4", "--no-progress"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = list(tmp_path.glob(".wiki_text_document.tmp-*.bin"))
            if tmp and tmp[0].stat().st_size > 100_000:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "preprocess finished before it could be stopped"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
