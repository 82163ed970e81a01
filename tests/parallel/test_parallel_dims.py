"""Parallel layout validation: clear errors, no processes needed."""

from __future__ import annotations

import pytest

from dsv3.errors import UserError
from dsv3.parallel import ParallelDims
from dsv3.config.layout import split_layers
from dsv3.parallel.pp import stage_ids
from parallel_harness import tiny_cfg


def seed_dims(**kw) -> ParallelDims:
    base = dict(data_parallel=2, model_parallel=2, pipeline_stage=2, expert_parallel=2, micro_batch_num=4)
    base.update(kw)
    return ParallelDims.from_config(base)


def test_seed_layout_is_valid():
    d = seed_dims()
    d.validate(8, tiny_cfg(), seq_len=32, batch_size=8)
    assert (d.world_size, d.edp, d.n_stages) == (8, 2, 2)


@pytest.mark.parametrize("kw, world, cfg_kw, match", [
    ({}, 4, {}, r"= 8 processes, but the launcher started 4"),
    ({"expert_parallel": 3, "data_parallel": 3, "model_parallel": 1}, 6, {}, r"expert_parallel = 3 does not divide n_routed_experts = 8"),
    ({"expert_parallel": 8}, 8, {}, r"expert_parallel = 8 must divide data_parallel x model_parallel = 4"),
    ({"model_parallel": 2}, 8, {"num_attention_heads": 3}, r"model_parallel = 2 does not divide num_attention_heads = 3"),
    ({"micro_batch_num": 1}, 8, {}, r"micro_batch_num = 1 is fewer than the 2 pipeline stages"),
    ({"micro_batch_num": 2, "pipeline_schedule": "Interleaved1F1B"}, 8, {}, r"micro_batch_num = 2 is fewer than the 4 pipeline stages"),
    ({"pipeline_schedule": "Nope"}, 8, {}, r"pipeline_schedule = 'Nope'"),
    ({"data_parallel": 0}, 8, {}, r"data_parallel = 0: must be >= 1"),
    ({"dp_shard": "zero1"}, 8, {}, r"zero1"),
])
def test_errors(kw, world, cfg_kw, match):
    with pytest.raises(UserError, match=match):
        seed_dims(**kw).validate(world, tiny_cfg(**cfg_kw) if cfg_kw else tiny_cfg())


def test_batch_and_sequence_errors():
    with pytest.raises(UserError, match="sequence length 33 is not divisible by model_parallel 2"):
        seed_dims().validate(8, seq_len=33)
    with pytest.raises(UserError, match="per-replica batch 2 is not divisible by micro_batch_num 4"):
        seed_dims().validate(8, batch_size=4)


def test_stage_split_and_rank_mapping():
    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert stage_ids(0, 2, 2, "loop") == [0, 2] and stage_ids(1, 2, 2, "loop") == [1, 3]
    assert stage_ids(0, 2, 2, "v") == [0, 3] and stage_ids(1, 2, 2, "v") == [1, 2]


def test_run_config_parallel_keys_reach_the_layout():
    """`parallel.dp_shard / pipeline_schedule / stages_per_rank` (YAML or --set) are what the strategy
    builds its layout from; a value the code cannot run is one line naming the key."""
    from dsv3.config.train import run_config_from_dict

    base = {"data": {"data_path": ["unused"]}}
    cfg = run_config_from_dict(base, ["parallel.pipeline_stage=2", "parallel.micro_batch_num=4", "parallel.dp_shard=ddp",
                                      "parallel.pipeline_schedule=ZBVZeroBubble", "parallel.stages_per_rank=2"])
    d = ParallelDims.from_config(cfg.parallel)
    assert (d.pp, d.dp_shard, d.schedule, d.v, d.n_stages, d.last_stage_rank) == (2, "ddp", "ZBVZeroBubble", 2, 4, 0)
    for override, match in (("parallel.pipeline_schedule=PipeDream", "pipeline_schedule"), ("parallel.dp_shard=hsdp", "dp_shard")):
        with pytest.raises(UserError, match=match):
            run_config_from_dict(base, [override])
