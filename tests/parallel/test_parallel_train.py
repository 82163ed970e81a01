"""The pretraining loop under `dsv3 launch`: the seed's 8-device layout (dp2 mp2 pp2 ep2,
micro_batch_num 4, 8 CPU processes, balance loss on, MindSpore offset [1, -1] so the stages hold 3
and 1 layers, recompute of [2, 1] layers) and a dp2 x pp2 run (4 processes) log the single-process
losses of the same global batch (one process: no recompute); DCP checkpoints and HF weights are
written, and the dp2 x pp2 checkpoint resumes under another layout (dp2 with FSDP, 2 processes) and
in one process with the losses of the uninterrupted run."""

from __future__ import annotations

import shutil

import pytest

from dsv3.config.load import dump_yaml
from parallel_harness import launch, losses, run_cfg, tiny_cfg, valid_losses, write_dataset

TOL = 1e-5


SEED_LAYOUT = {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 2, "expert_parallel": 2, "micro_batch_num": 4,
               "use_seq_parallel": True}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from dsv3.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("runs")
    prefix = write_dataset(tmp)
    # one process, same global batch (2 replicas x 2 micro-batches accumulated)
    ref = run_cfg(prefix, tmp / "ref", {"data_parallel": 2, "micro_batch_num": 2})
    Trainer(ref, quiet=True).fit()
    dist_cfg = tmp / "dp2pp2.yaml"
    dump_yaml(run_cfg(prefix, tmp / "dp2pp2", {"data_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2}), dist_cfg)
    launch(tmp, dist_cfg, 4)
    # resume step-2 of the dp2 x pp2 run under dp2 (no pipeline)
    (tmp / "resumed" / "checkpoint").mkdir(parents=True)
    shutil.copytree(tmp / "dp2pp2" / "checkpoint" / "step-2", tmp / "resumed" / "checkpoint" / "step-2")
    res_cfg = tmp / "dp2.yaml"
    dump_yaml(run_cfg(prefix, tmp / "resumed", {"data_parallel": 2, "micro_batch_num": 2}), res_cfg)
    launch(tmp, res_cfg, 2, "--resume")
    # and in one process (the trivial layout reads the DCP checkpoint)
    (tmp / "resumed1" / "checkpoint").mkdir(parents=True)
    shutil.copytree(tmp / "dp2pp2" / "checkpoint" / "step-2", tmp / "resumed1" / "checkpoint" / "step-2")
    one = run_cfg(prefix, tmp / "resumed1", {"data_parallel": 2, "micro_batch_num": 2})
    one.checkpoint.resume = True
    Trainer(one, quiet=True).fit()
    # the seed's layout, balance loss on, against one process accumulating the same global batch
    seed_ref = run_cfg(prefix, tmp / "seedref", {"data_parallel": 2, "micro_batch_num": 4}, batch_size=1, aux_loss_alpha=1e-3)
    seed_ref.checkpoint.export_hf = False
    Trainer(seed_ref, quiet=True).fit()
    seed_cfg = tmp / "seed.yaml"
    dump_yaml(run_cfg(prefix, tmp / "seed", {**SEED_LAYOUT, "pp_layer_offset": [1, -1], "recompute_layers": [2, 1]}, batch_size=1,
                      recompute="full", aux_loss_alpha=1e-3), seed_cfg)
    launch(tmp, seed_cfg, 8)
    return tmp


def test_seed_layout_8_processes(runs):
    ref, got = losses(runs / "seedref"), losses(runs / "seed")
    assert len(got) == len(ref) == 4
    assert max(abs(a - b) for a, b in zip(got, ref)) <= TOL, (got, ref)
    logs = sorted(p.name for p in (runs / "log-seed").glob("worker_*.log"))
    assert logs == [f"worker_{r}.log" for r in range(8)]
    assert "step 4/4 | loss" in (runs / "log-seed" / "worker_7.log").read_text()  # the last stage's log, as in the seed
    # evaluation under dp2 mp2 pp2 ep2 (the pipeline's forward-only pass) equals one process's
    vref, vgot = valid_losses(runs / "seedref"), valid_losses(runs / "seed")
    assert sorted(vgot) == sorted(vref) == [0, 2, 4]
    assert max(abs(vgot[k] - vref[k]) for k in vref) <= TOL, (vgot, vref)


def test_dp2xpp2_losses_equal_one_process(runs):
    ref, got = losses(runs / "ref"), losses(runs / "dp2pp2")
    assert len(got) == len(ref) == 4
    assert max(abs(a - b) for a, b in zip(got, ref)) <= TOL, (got, ref)
    vref, vgot = valid_losses(runs / "ref"), valid_losses(runs / "dp2pp2")
    assert sorted(vgot) == sorted(vref) == [0, 2, 4]
    assert max(abs(vgot[k] - vref[k]) for k in vref) <= TOL, (vgot, vref)


def test_checkpoints_and_hf_export(runs):
    from dsv3.checkpoint.io import from_pretrained

    ck = runs / "dp2pp2" / "checkpoint"
    assert sorted(p.name for p in ck.iterdir()) == ["step-2", "step-4"]
    assert (ck / "step-4" / ".metadata").is_file() and (ck / "step-4" / "trainer_state.pt").is_file()
    model = from_pretrained(runs / "dp2pp2" / "hf", dtype="float32")
    assert model.config.num_hidden_layers == tiny_cfg().num_hidden_layers


def test_resume_under_another_layout(runs):
    ref, got = losses(runs / "ref"), losses(runs / "resumed")
    assert len(got) == 2  # steps 3 and 4
    assert max(abs(a - b) for a, b in zip(got, ref[2:])) <= TOL, (got, ref)
    # evaluation under FSDP (dp2; it crashed with "FSDP requires a single root module") equals one process's
    vref, vgot = valid_losses(runs / "ref"), valid_losses(runs / "resumed")
    assert list(vgot) == [4] and abs(vgot[4] - vref[4]) <= TOL, (vgot, vref)


def test_resume_in_one_process(runs):
    """The dp2 x pp2 DCP checkpoint, resumed by the one-process trainer: losses and evaluation continue
    those of the uninterrupted one-process run."""
    ref, got = losses(runs / "ref"), losses(runs / "resumed1")
    assert len(got) == 2 and max(abs(a - b) for a, b in zip(got, ref[2:])) <= TOL, (got, ref)
    vref, vgot = valid_losses(runs / "ref"), valid_losses(runs / "resumed1")
    assert list(vgot) == [4] and abs(vgot[4] - vref[4]) <= TOL, (vgot, vref)
