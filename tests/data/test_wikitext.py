"""WikiText-2 fetcher: local folder, env, verified download (file:// URL), sha256 mismatch, offline."""

from __future__ import annotations

import lzma
import zipfile

import pytest

from dsv3.data.wikitext import SHA256, find_wikitext
from dsv3.errors import UserError


def _zip(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(f"wikitext-2/{name}", data)
    return path.as_uri()


def test_local_and_env(tmp_path, data_dir, monkeypatch):
    assert find_wikitext(data_dir / "wikitext-2") == data_dir / "wikitext-2"
    assert find_wikitext(data_dir) == data_dir / "wikitext-2"
    monkeypatch.setenv("DSV3_DATA_DIR", str(data_dir))
    assert find_wikitext() == data_dir / "wikitext-2"
    with pytest.raises(UserError, match="no wiki.train.tokens"):
        find_wikitext(tmp_path)


def test_download_verified_and_cached(tmp_path, data_dir, monkeypatch):
    monkeypatch.delenv("DSV3_DATA_DIR", raising=False)
    src = data_dir / "wikitext-2"
    files = {"wiki.train.tokens": lzma.open(src / "wiki.train.tokens.xz").read(),
             "wiki.valid.tokens": (src / "wiki.valid.tokens").read_bytes()}
    good = _zip(tmp_path / "good.zip", files)
    cache = tmp_path / "cache"
    d = find_wikitext(urls=("http://127.0.0.1:9/unreachable.zip", good), cache_dir=cache)
    assert d == cache and sorted(p.name for p in cache.iterdir()) == sorted(SHA256)
    assert find_wikitext(urls=(), cache_dir=cache) == cache  # cached: no download needed
    bad = _zip(tmp_path / "bad.zip", {**files, "wiki.valid.tokens": b"tampered"})
    with pytest.raises(UserError, match="wiki.valid.tokens sha256 .* does not match"):
        find_wikitext(urls=(bad,), cache_dir=tmp_path / "c2")
    assert not (tmp_path / "c2").exists()


def test_offline_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("DSV3_DATA_DIR", raising=False)
    with pytest.raises(UserError, match="could not be downloaded .*DSV3_DATA_DIR"):
        find_wikitext(urls=("http://127.0.0.1:9/wikitext-2-v1.zip",), cache_dir=tmp_path)
