"""DCP checkpoints: saved under dp2 x pp2 (4 ranks), loaded under dp4 and in a single process with
the same next-step loss; exported to HF safetensors that `from_pretrained` reads back."""

from __future__ import annotations

import pytest
import torch

from dsv3.errors import UserError
from dsv3.parallel import lm_loss
from dsv3.parallel.dcp import export_hf, load
from parallel_harness import batches, make_model, spawn, tiny_cfg

TOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("dcp") / "step-2"
    res = spawn(4, [(tiny_cfg(), str(ckpt))], "dcp_roundtrip_job")[0]
    assert "error" not in res, res.get("trace")
    return ckpt, res["ok"]


def _next_loss(model, cfg) -> float:
    w = batches(cfg, 4)[2]
    with torch.no_grad():
        logits, mtp = model(w[:, :-1], return_mtp=True)
        return lm_loss(logits, w[:, 1:], mtp).item()


def test_dp2xpp2_to_dp4(saved):
    _, res = saved
    # steps 3 and 4: step 3 checks the weights, step 4 also the optimizer moments and the router bias
    assert max(abs(a - b) for a, b in zip(res["loaded"], res["saved"])) <= TOL, res


def test_dp2xpp2_to_single_process(saved):
    ckpt, res = saved
    cfg = tiny_cfg()
    model = make_model(cfg, seed=7)  # different init: everything must come from the checkpoint
    load(ckpt, [model])
    assert abs(_next_loss(model, cfg) - res["saved"][0]) <= TOL


def test_export_hf(saved, tmp_path):
    from dsv3.checkpoint.io import from_pretrained

    ckpt, res = saved
    cfg = tiny_cfg()
    out = export_hf(ckpt, cfg, tmp_path / "hf")
    model = from_pretrained(out, dtype="float32")
    assert abs(_next_loss(model, cfg) - res["saved"][0]) <= TOL


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a DCP checkpoint"):
        load(tmp_path, [make_model(tiny_cfg())])
