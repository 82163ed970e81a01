"""Activation recompute (`train.recompute`, `parallel.recompute_layers`) and per-stage layer offsets
(`parallel.pp_layer_offset`): identical losses with and without recompute in the real trainer, the
MindSpore keys mapped, the 671B YAML's arithmetic, and one-line errors for bad lists."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from dsv3.config.schema import ModelConfig
from dsv3.errors import UserError
from dsv3.config.layout import recompute_layer_ids, stage_layers

from run_config import MODEL, small_run, train_losses


def _cfg(layers: int, mtp: int = 1) -> ModelConfig:
    return ModelConfig(**{**MODEL, "num_hidden_layers": layers, "num_nextn_predict_layers": mtp})


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_same_losses(wiki_prefix, tmp_path, mode):
    from dsv3.train.trainer import Trainer

    base = dict(train={"steps": 3})
    Trainer(small_run(wiki_prefix, tmp_path / "plain", **base), quiet=True).fit()
    cfg = small_run(wiki_prefix, tmp_path / mode, train={"steps": 3, "recompute": mode})
    t = Trainer(cfg, quiet=True)
    wrapped = [n for n, _ in t.model.named_modules() if n.endswith("_checkpoint_wrapped_module")]
    assert len(wrapped) == 3  # both decoder layers and the MTP block
    t.fit()
    a, b = train_losses(tmp_path / "plain"), train_losses(tmp_path / mode)
    assert len(a) == 3 and max(abs(a[k] - b[k]) for k in a) <= 1e-6, (a, b)
    # the checkpoint holds the plain names (torch's wrapper strips its prefix from state dicts)
    from safetensors import safe_open

    with safe_open(str(tmp_path / mode / "checkpoint" / "step-3" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "model.layers.0.self_attn.q_a_proj.weight" in keys and not any("wrapped" in k for k in keys)


def test_671b_offsets_and_recompute_add_up():
    cfg = _cfg(61)
    offset = [1] * 15 + [-1]
    per_stage = stage_layers(cfg, 16, offset)
    assert [len(s) for s in per_stage] == [4] * 15 + [1]  # + the MTP layer on the last stage: 62 = 61 + 1
    assert per_stage[-1] == [60] and sum(map(len, per_stage)) == 61
    ids = recompute_layer_ids(cfg, "full", per_stage, [3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 3, 2, 0])
    assert len(ids) == 3 + 4 * 12 + 3 + 2 and 0 in ids and 3 not in ids and 60 not in ids and 61 not in ids
    assert stage_layers(_cfg(4), 2, [1, -1]) == [[0, 1, 2], [3]]  # 4 layers: MTP not counted
    assert stage_layers(_cfg(4), 2, [1, 0]) == [[0, 1, 2], [3]]  # 5 = 4 + MTP: counted in the last stage
    assert stage_layers(_cfg(5), 2) == [[0, 1, 2], [3, 4]]  # no offset: remainder to the earlier stages


@pytest.mark.parametrize("parallel,train,match", [
    ({"pipeline_stage": 2, "micro_batch_num": 2, "pp_layer_offset": [1, 0, -1]}, {}, "3 entries for 2 pipeline stages"),
    ({"pipeline_stage": 2, "micro_batch_num": 2, "pp_layer_offset": [1, -1]}, {}, "leaves pipeline stage 1 without a decoder layer"),
    ({"pipeline_stage": 2, "micro_batch_num": 2, "pp_layer_offset": [1, 2]}, {}, "need a total of 2 or 3"),
    ({"pipeline_stage": 2, "micro_batch_num": 2, "recompute_layers": [1, 3]}, {"recompute": "full"}, r"recompute_layers\[1\] = 3"),
    ({"pipeline_stage": 2, "micro_batch_num": 2, "recompute_layers": [1]}, {"recompute": "full"}, "1 entries for 2 pipeline stages"),
    ({"recompute_layers": [1]}, {}, "train.recompute is 'none'"),
])
def test_bad_lists_one_line(tmp_path, parallel, train, match):
    d = {"model": {**MODEL, "num_hidden_layers": 2}, "data": {"data_path": ["x"], "seq_length": 32},
         "train": {"steps": 1, **train}, "parallel": parallel}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(d))
    p = subprocess.run([sys.executable, "-m", "dsv3", "train", "--config", str(path)], capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr
    import re

    assert re.search(match, p.stderr), p.stderr


def test_mindspore_offset_and_recompute_mapped(data_dir):
    from dsv3.config.train import run_config_from_dict

    d = yaml.safe_load((data_dir.parent / "mindformers-configs" / "pretrain_deepseek3_671b.yaml").read_text(encoding="utf-8"))
    cfg = run_config_from_dict(d, source="671b.yaml")
    assert cfg.parallel.pp_layer_offset == [1] * 15 + [-1]
    assert cfg.parallel.recompute_layers == [3] + [4] * 12 + [3, 2, 0] and cfg.train.recompute == "full"
    cfg.validate()
    d["recompute_config"] = {"recompute": True, "select_recompute": True}
    d["model"]["model_config"]["offset"] = 0
    cfg = run_config_from_dict(d, source="671b.yaml")
    assert cfg.train.recompute == "selective" and cfg.parallel.recompute_layers is None and cfg.parallel.pp_layer_offset is None
    d["model"]["model_config"]["offset"] = [[1, 0], [0, -1]]
    with pytest.raises(UserError, match="nested lists"):
        run_config_from_dict(d, source="671b.yaml")
