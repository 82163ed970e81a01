"""`train.init_from` of a checkpoint written by transformers (`DeepseekV3ForCausalLM.save_pretrained`):
the shipped trainer's first-step LM loss equals transformers' loss on the same global batch, in one
process (`dsv3 train`) and under dp2 x pp2 (`dsv3 launch`, 4 gloo processes); each rank of a parallel
layout reads only its own slices (counted through a wrapper around safetensors' `safe_open`); bad
checkpoints fail through the CLI with one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dsv3.config.load import dump_yaml, to_dict
from dsv3.config.train import run_config_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from hf_oracle import make_hf_checkpoint  # noqa: E402
from spawn_harness import spawn  # noqa: E402
from parallel_harness import launch, write_dataset  # noqa: E402

TOL = 1e-5
M, DP, BS = 2, 2, 1  # micro-batches per replica, replicas, sequences per micro-batch


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> str:
    """The synthetic token data (ids < 256) the parallel tests train on."""
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A transformers-written checkpoint (sharded) and the model that wrote it."""
    d = tmp_path_factory.mktemp("hf")
    model = make_hf_checkpoint(d, max_shard_size="60KB", num_hidden_layers=4)
    return d, model


def run_cfg(hf_dir: Path, prefix: str, out: Path, parallel: dict, steps: int = 1):
    from dsv3.checkpoint.reader import load_dir_config

    d = {"model": to_dict(load_dir_config(hf_dir)[0]),
         "data": {"data_path": [prefix], "split": "100,0,0", "seq_length": 32},
         "train": {"steps": steps, "batch_size": BS, "seed": 0, "device": "cpu", "threads": 1, "init_from": str(hf_dir)},
         "lr_schedule": {"type": "cosine", "learning_rate": 1e-3, "warmup_steps": 0},
         "checkpoint": {"output_dir": str(out), "save_steps": 0, "export_hf": False},
         "eval": {"eval_steps": 0, "eval_at_end": False},
         "logging": {"progress_bar": False, "plots": False}, "parallel": {"micro_batch_num": M, **parallel}}
    d["model"]["num_nextn_predict_layers"] = 0  # transformers writes no MTP weights
    cfg = run_config_from_dict(d)
    cfg.validate()
    return cfg


def first_lm_loss(out: Path) -> float:
    rec = next(json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in s)
    return rec["lm_loss"]


@pytest.fixture(scope="module")
def oracle(hf, prefix, tmp_path_factory) -> float:
    """transformers' LM loss on step 1's global batch (the loader's first DP x M micro-batches), as the
    trainer means it: per micro-batch token mean, averaged."""
    from dsv3.train.trainer import build_data

    hf_dir, model = hf
    cfg = run_cfg(hf_dir, prefix, tmp_path_factory.mktemp("o"), {"data_parallel": DP})
    it = iter(build_data(cfg, M * DP).train)
    means = []
    with torch.no_grad():
        for _ in range(M * DP):
            b = next(it)
            logits = model(b["tokens"]).logits
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), b["labels"].flatten(), reduction="none")
            mask = b["loss_mask"].flatten().double()
            means.append(float((ce * mask).sum() / mask.sum()))
    return sum(means) / len(means)


def test_one_process_first_loss_equals_transformers(hf, prefix, oracle, tmp_path, capsys):
    from dsv3.cli import main

    cfg = run_cfg(hf[0], prefix, tmp_path / "run", {"data_parallel": DP})
    dump_yaml(cfg, tmp_path / "c.yaml")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 0
    assert f"init_from {hf[0]}" in capsys.readouterr().err
    assert abs(first_lm_loss(tmp_path / "run") - oracle) <= TOL


def test_dp2xpp2_first_loss_equals_transformers(hf, prefix, oracle, tmp_path):
    cfg = run_cfg(hf[0], prefix, tmp_path / "run", {"data_parallel": DP, "pipeline_stage": 2})
    dump_yaml(cfg, tmp_path / "dp2pp2.yaml")
    launch(tmp_path, tmp_path / "dp2pp2.yaml", 4)
    assert abs(first_lm_loss(tmp_path / "run") - oracle) <= TOL
    log = (tmp_path / "log-dp2pp2" / "worker_0.log").read_text()
    assert f"init_from {hf[0]}" in log and "bytes read (this rank's slices)" in log


def test_each_rank_reads_only_its_slices(hf):
    """dp2 x pp2 (FSDP) and dp2 x tp2 with ep2 (4 ranks): every rank's shards equal the checkpoint's
    boxes, it read exactly its shards' bytes (no get_tensor at all), and never the whole stored tensor
    of a parameter it holds a shard of."""
    from dsv3.checkpoint.reader import load_dir_config

    cfg = load_dir_config(hf[0])[0]
    jobs = [(cfg, {"data_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2}, str(hf[0])),
            (cfg, {"data_parallel": 2, "model_parallel": 2, "expert_parallel": 2, "use_seq_parallel": True}, str(hf[0]))]
    results = spawn(4, jobs, "init_from_slices_job")
    for job, res in zip(jobs, results):
        assert "ok" in res, res.get("trace")
        ranks = res["ok"]
        total = ranks[0]["model_bytes"]
        for r in ranks:
            assert r["max_abs_diff"] == 0.0, (job[1], r)
            assert r["get_tensor_calls"] == 0 and r["full_reads_of_sharded"] == [] and r["sharded_checked"] > 0, (job[1], r)
            assert r["bytes_read"] == r["local_bytes"], (job[1], r)
            assert r["bytes_read"] < 0.7 * total, (job[1], r)  # a shard of the model, never all of it
        assert sum(r["bytes_read"] for r in ranks) >= total  # together they read every tensor


def _damage(src: Path, dst: Path, how: str) -> str:
    """Copy `src` with one tensor dropped / renamed to an unknown one / reshaped; returns its name."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    shard = dst / index["weight_map"][name]
    tensors = load_file(str(shard))
    t = tensors.pop(name)
    if how == "unexpected":
        tensors[name] = t
        tensors["model.layers.1.self_attn.k_proj.weight"] = t.clone()
        index["weight_map"]["model.layers.1.self_attn.k_proj.weight"] = shard.name
    elif how == "shape":
        tensors[name] = t[:-1].clone()
    else:
        del index["weight_map"][name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"missing": f"missing tensors: {name}", "unexpected": "unexpected tensors: model.layers.1.self_attn.k_proj.weight",
            "shape": f"wrong shape: {name} [{t.shape[0] - 1}, {t.shape[1]}] (expected {list(t.shape)})"}[how]


@pytest.mark.parametrize("how", ["missing", "unexpected", "shape", "architecture"])
def test_bad_checkpoint_is_one_line(hf, prefix, tmp_path, capsys, how):
    from dsv3.cli import main

    cfg = run_cfg(hf[0], prefix, tmp_path / "run", {"data_parallel": 1})
    if how == "architecture":
        ckpt, expect = hf[0], "architecture differs from the run's model config: hidden_size: checkpoint 64, config 96"
        cfg.model.hidden_size = 96
    else:
        ckpt = tmp_path / "bad"
        expect = _damage(hf[0], ckpt, how)
        cfg.train.init_from = str(ckpt)
    dump_yaml(cfg, tmp_path / "c.yaml")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert expect in err[-1] and str(ckpt) in err[-1] and "Traceback" not in "\n".join(err), err
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_mindspore_load_checkpoint_is_init_from(data_dir, tmp_path, capsys):
    """The seed's `load_checkpoint` (with `auto_trans_ckpt`: resharding is what init_from always does)."""
    import yaml

    from dsv3.config.train import run_config_from_dict

    d = yaml.safe_load((data_dir.parent / "mindformers-configs" / "pretrain_deepseek3_671b.yaml").read_text(encoding="utf-8"))
    d.update(load_checkpoint=str(tmp_path), auto_trans_ckpt=True)
    assert run_config_from_dict(d, source="671b.yaml").train.init_from == str(tmp_path)
    assert "auto_trans_ckpt (train.init_from always reads each rank's own slices" in capsys.readouterr().err
