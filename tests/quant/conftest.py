"""Shared fixtures of the quantisation tests: a small random checkpoint (tiny config, 512-token vocab, MTP).
Helpers the tests import live in `quant_helpers.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

from quant_helpers import small_model


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("quant_small") / "fp32"
    small_model().save_pretrained(d)
    return d
