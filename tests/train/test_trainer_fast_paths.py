"""The trainer swaps `dsv3.kernels`' fast paths into the plain model it builds (issue 21 item 4)."""

from __future__ import annotations

import torch
from torch import nn

from dsv3.kernels.grouped import GroupedExperts
from dsv3.kernels.onednn import OneDNNLinear
from dsv3.model.moe import Experts
from dsv3.train.strategy import build_model

from run_config import small_run


def test_trainer_model_has_fast_paths(tmp_path):
    """The single-process trainer's model (`build_model`): every plain nn.Linear / Experts swapped,
    checkpoint names those of the plain `Transformer`."""
    from dsv3.model import Transformer

    cfg = small_run(str(tmp_path / "data"), tmp_path / "out")
    model = build_model(cfg, torch.device("cpu"))
    assert type(model.lm_head) is OneDNNLinear
    assert all(type(m.experts) is GroupedExperts for m in model.moe_layers())
    assert not any(type(m) in (nn.Linear, Experts) for m in model.modules())
    with torch.device("meta"):
        plain = Transformer(cfg.model)
    assert list(model.state_dict()) == list(plain.state_dict())
