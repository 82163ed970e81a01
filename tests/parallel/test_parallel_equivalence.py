"""Each layout, trained by the shipped trainer on 2 (or 4) CPU processes (gloo), logs the one-process
losses of the same global batch (4 sequences per step) within 1e-5 over 3 steps, training and
evaluation (at steps 0 and 3), with the sequence-wise balance loss on. One torchrun per process count runs
every layout in turn (`multi_run.py`); the one-process references run here. BF16 AdamW moments
(`optimizer.state_dtype`) under FSDP + EP are checked against one process with BF16 moments, and
each rank's parameter bytes under pp2 and ep2 are about half of the model's."""

from __future__ import annotations

import json

import pytest

from dsv3.config.load import dump_yaml
from parallel_harness import losses, make_model, multi_run, run_cfg, tiny_cfg, valid_losses, write_dataset

TOL = 1e-5
STEPS = 3
AUX = 1e-3  # the balance loss is in the objective
PP = {"pipeline_stage": 2, "micro_batch_num": 4}
LAYOUTS = {  # global batch: batch_size 1 x data_parallel x micro_batch_num = 4
    "dp2-fsdp": {"data_parallel": 2, "micro_batch_num": 2},
    "dp2-ddp": {"data_parallel": 2, "micro_batch_num": 2, "dp_shard": "ddp"},
    "dp2-zero1": {"data_parallel": 2, "micro_batch_num": 2, "dp_shard": "zero1"},
    "tp2-sp": {"model_parallel": 2, "micro_batch_num": 4, "use_seq_parallel": True},
    "ep2": {"data_parallel": 2, "micro_batch_num": 2, "expert_parallel": 2},
    # MindSpore offset [1, -1]: stages of 3 and 1 (+ the MTP block) layers, about half the parameters each
    "pp2-1F1B": {**PP, "pipeline_schedule": "1F1B", "pp_layer_offset": [1, -1]},
    "pp2-DualPipeV": {**PP, "pipeline_schedule": "DualPipeV"},
    "pp2-Interleaved1F1B": {**PP, "pipeline_schedule": "Interleaved1F1B"},
    "pp2-ZBVZeroBubble": {**PP, "pipeline_schedule": "ZBVZeroBubble"},
    "pp2-GPipe": {**PP, "pipeline_schedule": "GPipe"},
    "tp2-nosp": {"model_parallel": 2, "micro_batch_num": 4, "use_seq_parallel": False},
    "tp2xep2": {"model_parallel": 2, "micro_batch_num": 4, "expert_parallel": 2},
}
FOUR = {  # 4 processes
    "dp2xtp2xep2": {"data_parallel": 2, "model_parallel": 2, "expert_parallel": 2, "micro_batch_num": 2},  # 2-D FSDP
    # experts FSDP-sharded over edp 2 < dp 4: the step gradient is the edp sum / dp, not FSDP's edp mean
    "dp4xep2": {"data_parallel": 4, "expert_parallel": 2, "micro_batch_num": 1},
    "dp4-hsdp2": {"data_parallel": 4, "dp_replicate": 2, "micro_batch_num": 1},  # FSDP over 2, replicated twice
    "tp2xep2xpp2-interleaved": {"model_parallel": 2, "expert_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 4,
                                "pipeline_schedule": "Interleaved1F1B"},
    # FSDP under PP reduce-scatters every micro-batch's gradients instead of holding them unsharded
    "dp2xpp2-reduce-every-microbatch": {"data_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2,
                                        "reduce_grads_every_microbatch": True},
}
BF16 = {"ep2-bf16-state": {"data_parallel": 2, "micro_batch_num": 2, "expert_parallel": 2}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from dsv3.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("equiv")
    prefix = write_dataset(tmp)
    kw = dict(steps=STEPS, batch_size=1, save=False, eval_steps=STEPS, aux_loss_alpha=AUX)
    for name, state in (("ref", "float32"), ("ref-bf16", "bfloat16")):
        Trainer(run_cfg(prefix, tmp / name, {"data_parallel": 2, "micro_batch_num": 2}, state_dtype=state, **kw), quiet=True).fit()
    (tmp / "held").mkdir()
    for n, layouts in ((2, {**LAYOUTS, **BF16}), (4, FOUR)):
        configs = []
        for name, par in layouts.items():
            configs.append(tmp / f"{name}.yaml")
            dump_yaml(run_cfg(prefix, tmp / name, par, state_dtype="bfloat16" if name in BF16 else "float32", **kw), configs[-1])
        multi_run(n, configs, tmp / "held")
    return tmp


def _held(runs, name: str) -> list[dict]:
    out = [json.loads((runs / "held" / f"{name}.rank{r}.json").read_text()) for r in range(4 if name in FOUR else 2)]
    for r in out:
        assert "error" not in r, r.get("trace")
    return [r["ok"] for r in out]


def _check(runs, name: str, ref: str) -> None:
    _held(runs, name)  # no error on either rank
    want, got = losses(runs / ref), losses(runs / name)
    assert len(got) == len(want) == STEPS
    assert max(abs(a - b) for a, b in zip(got, want)) <= TOL, (got, want)
    vwant, vgot = valid_losses(runs / ref), valid_losses(runs / name)
    assert vwant[STEPS] < vwant[0] - 0.1  # the steps really train (a wrong gradient would show)
    assert sorted(vgot) == sorted(vwant) == [0, STEPS]
    assert max(abs(vgot[k] - vwant[k]) for k in vwant) <= TOL, (vgot, vwant)


@pytest.mark.parametrize("name", [*LAYOUTS, *FOUR])
def test_losses_equal_one_process(runs, name):
    _check(runs, name, "ref")


def test_bf16_moments_under_fsdp_and_ep(runs):
    _check(runs, "ep2-bf16-state", "ref-bf16")
    assert losses(runs / "ref-bf16") != losses(runs / "ref")  # BF16 moments really differ from fp32 ones


def test_only_rank_0_writes_the_run_directory(runs):
    assert sorted(p.name for p in (runs / "dp2-fsdp").iterdir()) == ["config.resolved.yaml", "metrics.jsonl"]


@pytest.mark.parametrize("name", ["pp2-1F1B", "ep2"])
def test_each_rank_holds_about_half(runs, name):
    """Each rank allocates only its part: pp2's stages together are the model (the last stage's
    embedding copy counted once), ep2 splits the experts and FSDP-shards the dense weights, the shared
    experts and the routers."""
    model = make_model(tiny_cfg(aux_loss_alpha=AUX))
    total = sum(p.numel() for p in model.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    held = _held(runs, name)
    for r in held:
        assert 0.4 * total_bytes < r["local_bytes"] < 0.6 * total_bytes, (r, total_bytes)
    if name == "pp2-1F1B":
        assert sum(r["stage_params"] for r in held) == total


def test_hsdp_shards_over_the_group_and_replicates_across(runs):
    """dp4 with dp_replicate 2: each rank holds about half of the dense weights, shared experts and
    routers (sharded over 2, not 4; 38% of the tiny model with the routed experts' FSDP shards), and
    ranks r and r+2 (the two replicas of one shard) hold the same amount."""
    model = make_model(tiny_cfg(aux_loss_alpha=AUX))
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    held = _held(runs, "dp4-hsdp2")
    for r in held:
        assert 0.3 * total_bytes < r["local_bytes"] < 0.6 * total_bytes, (r, total_bytes)
    assert held[0]["local_bytes"] == held[2]["local_bytes"] and held[1]["local_bytes"] == held[3]["local_bytes"]
