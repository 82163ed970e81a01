"""DCP checkpoint errors (saving under one layout and resuming under another, one process included,
runs through the trainer in test_parallel_train)."""

from __future__ import annotations

import pytest

from dsv3.errors import UserError
from dsv3.parallel.dcp import load
from parallel_harness import make_model, tiny_cfg


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a DCP checkpoint"):
        load(tmp_path, [make_model(tiny_cfg())])
