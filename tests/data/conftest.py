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
