"""Make the transformers oracle helpers of tests/model importable here; a shared tiny HF checkpoint."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))


@pytest.fixture(scope="session")
def good(tmp_path_factory):
    """A tiny transformers-written checkpoint in several shards (read-only: copy it to alter it)."""
    from hf_oracle import make_hf_checkpoint

    d = tmp_path_factory.mktemp("good")
    make_hf_checkpoint(d, max_shard_size="60KB")
    return d


@pytest.fixture
def copy_checkpoint():
    """copy(src, dst) -> dst: a flat copy of a checkpoint directory to damage."""

    def copy(src, dst):
        dst.mkdir()
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        return dst

    return copy
