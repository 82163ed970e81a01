"""The layout-independent init (`dsv3.parallel.init`): a shard drawn on its own equals the same box
of the whole parameter, the meta build is the single-process trainer's build, and no rank-0 value
leaks into a different name or seed. (The multi-process equality is in test_parallel_equivalence.)"""

from __future__ import annotations

import pytest
import torch

from dsv3.parallel import init as pinit
from parallel_harness import make_model, tiny_cfg


@pytest.mark.parametrize("shape,offset,local", [
    ((300, 70), (0, 0), (300, 70)),            # whole
    ((300, 70), (150, 0), (150, 70)),          # FSDP row shard
    ((300, 70), (37, 35), (100, 35)),          # row x column box (FSDP x TP), crossing block borders
    ((8, 40, 30), (4, 0, 0), (4, 40, 30)),     # stacked experts, EP shard
    ((8, 40, 30), (2, 20, 0), (3, 20, 30)),
])
def test_shard_equals_box_of_whole(shape, offset, local, monkeypatch):
    monkeypatch.setattr(pinit, "BLOCK", 2048)  # several blocks even for these small shapes
    whole = torch.empty(shape)
    pinit.normal_slice_(whole, (0,) * len(shape), shape, 0.02, 5, "w")
    part = torch.empty(local)
    pinit.normal_slice_(part, offset, shape, 0.02, 5, "w")
    box = tuple(slice(o, o + n) for o, n in zip(offset, local))
    assert torch.equal(part, whole[box])
    other = torch.empty(shape)
    pinit.normal_slice_(other, (0,) * len(shape), shape, 0.02, 5, "v")
    assert not torch.equal(other, whole)
    assert abs(float(whole.std()) - 0.02) < 0.003


def test_meta_build_equals_trainer_build_and_rule():
    from dsv3.config.train import RunConfig
    from dsv3.train.strategy import build_model

    cfg = tiny_cfg()
    a = make_model(cfg, seed=3)
    run = RunConfig(model=cfg)
    run.train.seed = 3
    b = build_model(run, torch.device("cpu"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.model.norm.weight, torch.ones_like(a.model.norm.weight))
    moe = a.moe_layers()[0]
    assert not moe.gate.e_score_correction_bias.any() and not moe.tokens_per_expert.any()
    assert torch.equal(a.rotary.inv_freq, type(a.rotary)(cfg).inv_freq)
    c = make_model(cfg, seed=4)
    assert not torch.equal(c.lm_head.weight, a.lm_head.weight)
