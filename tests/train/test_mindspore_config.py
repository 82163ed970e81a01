"""The seed's MindSpore YAML -> RunConfig: mapped keys honoured, Ascend-only keys listed once, typos rejected."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from dsv3.config.train import load_run_config, run_config_from_dict
from dsv3.errors import UserError
from dsv3.model import Transformer

from seed_recipe import seed_1b_dict

REPO = Path(__file__).resolve().parents[2]


def _671b(data_dir: Path) -> dict:
    return yaml.safe_load((data_dir.parent / "mindformers-configs" / "pretrain_deepseek3_671b.yaml").read_text(encoding="utf-8"))


def test_671b_yaml_maps_to_our_fields(data_dir, capsys):
    cfg = run_config_from_dict(_671b(data_dir), source="671b.yaml")
    m = cfg.model
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.n_routed_experts, m.num_experts_per_tok) == (7168, 61, 128, 256, 8)
    assert (m.first_k_dense_replace, m.n_group, m.topk_group, m.routed_scaling_factor, m.norm_topk_prob) == (3, 8, 4, 2.5, True)
    assert m.rope_scaling is None and m.scoring_func == "sigmoid" and m.topk_method == "noaux_tc"
    assert m.aux_loss_alpha == 1e-4 and m.num_nextn_predict_layers == 1
    assert cfg.train.mtp_loss_factor == 0.3 and cfg.train.bias_update_rate == 0.001 and cfg.train.precision == "bf16"
    assert cfg.data.seq_length == 4096 and cfg.data.data_path == ["./dataset"] and cfg.data.split == "1,0,0"
    assert cfg.lr_schedule.type == "ConstantWarmUpLR" and cfg.lr_schedule.warmup_ratio == 0.02
    assert cfg.optimizer.betas == (0.9, 0.95) and cfg.optimizer.eps == 1e-8 and cfg.optimizer.clip_grad == 1.0
    assert cfg.checkpoint.save_steps == 1000 and cfg.checkpoint.keep_last == 5
    assert cfg.parallel.pipeline_stage == 16 and cfg.parallel.micro_batch_num == 32
    assert cfg.train.steps == 2 * 5000 // (1 * 16 * 32)  # epochs x sizes[0] / global batch
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ignored" in err[0] and "context" in err[0] and "capacity_factor" in err[0]


def test_seed_1b_recipe(data_dir, capsys):
    cfg = run_config_from_dict(seed_1b_dict(data_dir))
    m = cfg.model
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.intermediate_size) == (2048, 3, 8, 6144)
    assert (m.n_routed_experts, m.first_k_dense_replace, m.norm_topk_prob) == (16, 1, False)
    assert m.aux_loss_alpha == 0.001 and cfg.train.bias_update_rate == 1e-4
    assert cfg.lr_schedule.warmup_steps == 20
    assert cfg.micro_batches_per_step() == 8  # dp 2 x micro_batch_num 4 on one process
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(m).parameters())
    assert 1.2e9 < n < 1.3e9  # ~1B + the MTP module


def test_seed_1b_equals_our_pretrain_1b_yaml(data_dir):
    """configs/pretrain_1b.yaml is the seed recipe in our format: same model, losses, optimizer, LR, layout."""
    from dsv3.config.load import to_dict
    from dsv3.config.presets import load_model_config

    ours = load_run_config(REPO / "configs" / "pretrain_1b.yaml")
    seed = run_config_from_dict(seed_1b_dict(data_dir))
    for section in ("model", "train", "optimizer", "lr_schedule", "parallel"):
        a, b = to_dict(getattr(ours, section)), to_dict(getattr(seed, section))
        if section == "optimizer":  # ours keeps AdamW moments in BF16 to fit 24 GB; MindSpore's YAML has no such key
            assert a.pop("state_dtype") == "bfloat16" and b.pop("state_dtype") == "float32"
        if section == "train":  # the seed recomputes every layer ([3, 4] cut to its 2 + 2 layers); one CPU process fits without it
            assert a.pop("recompute") == "none" and b.pop("recompute") == "full"
        if section == "parallel":
            assert a.pop("recompute_layers") is None and b.pop("recompute_layers") == [2, 2]
        assert a == b, (section, {k: (a[k], b[k]) for k in a if a[k] != b[k]})
    assert ours.data.seq_length == seed.data.seq_length and ours.data.split == seed.data.split
    preset = load_model_config(REPO / "configs" / "deepseek_v3_1b.yaml")
    assert to_dict(preset) == {**to_dict(ours.model), "aux_loss_alpha": 0.0}


@pytest.mark.parametrize("section,key", [("moe_config", "expert_nun"), ("model.model_config", "hiden_size"), ("", "sed")])
def test_misspelt_key_is_an_error(data_dir, section, key):
    d = copy.deepcopy(_671b(data_dir))
    node = d
    for part in filter(None, section.split(".")):
        node = node[part]
    node[key] = 1
    with pytest.raises(UserError, match=key):
        run_config_from_dict(d, source="x.yaml")


@pytest.mark.parametrize("patch,match", [
    ({"moe_config": {"aux_loss_types": ["expert", "device"], "aux_loss_factors": [1e-4, 0.1]}}, "device"),
    ({"moe_config": {"z_loss_factor": 0.1}}, "z-loss"),
    ({"lr_schedule": {"type": "PolynomialLR"}}, "PolynomialLR"),
    ({"run_mode": "predict"}, "predict"),
])
def test_unsupported_values_are_errors(data_dir, patch, match):
    d = copy.deepcopy(_671b(data_dir))
    for k, v in patch.items():
        if isinstance(v, dict):
            d[k].update(v)
        else:
            d[k] = v
    with pytest.raises(UserError, match=match):
        run_config_from_dict(d)


def test_our_pretrain_yamls_load():
    files = sorted((REPO / "configs").glob("pretrain_*.yaml"))
    assert files
    for f in files:
        cfg = load_run_config(f)
        assert cfg.data.data_path


def test_overrides_apply_after_translation(data_dir, tmp_path):
    p = tmp_path / "seed.yaml"
    p.write_text(yaml.safe_dump(seed_1b_dict(data_dir)), encoding="utf-8")
    cfg = load_run_config(p, ["train.steps=3", "data.seq_length=128"])
    assert cfg.train.steps == 3 and cfg.data.seq_length == 128
    with pytest.raises(UserError, match="stepz"):
        load_run_config(p, ["train.stepz=3"])


def test_absent_weight_decay_is_mindformers_default(data_dir):
    """MindFormers' AdamW uses weight_decay 0.0 when the YAML sets none (the seed's files set none)."""
    d = _671b(data_dir)
    assert "weight_decay" not in d["optimizer"]
    assert run_config_from_dict(copy.deepcopy(d), source="671b.yaml").optimizer.weight_decay == 0.0
    d["optimizer"]["weight_decay"] = 0.05
    assert run_config_from_dict(d, source="671b.yaml").optimizer.weight_decay == 0.05


def test_translate_returns_its_notes_and_the_cli_prints_them(data_dir, capsys):
    """`translate` (a table of per-section rules) prints nothing: it returns the ignored-keys line for the
    caller; `run_config_from_dict(..., notes=[...])` hands them on; `dsv3 train` prints them once."""
    import subprocess
    import sys

    from dsv3.config.mindspore import SECTIONS, translate

    out, notes = translate(_671b(data_dir), "671b.yaml")
    assert capsys.readouterr().err == ""
    assert len(notes) == 1 and notes[0].startswith("671b.yaml: ignored (MindSpore/Ascend-only):") and "capacity_factor" in notes[0]
    assert out["model"]["hidden_size"] == 7168 and {"model", "moe_config", "parallel_config", "callbacks"} <= set(SECTIONS)
    said: list[str] = []
    run_config_from_dict(_671b(data_dir), source="671b.yaml", notes=said)
    assert said == notes and capsys.readouterr().err == ""
    yaml_path = data_dir.parent / "mindformers-configs" / "pretrain_deepseek3_671b.yaml"
    p = subprocess.run([sys.executable, "-m", "dsv3", "train", "--config", str(yaml_path), "--dump-config"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "hidden_size: 7168" in p.stdout, p.stderr[-2000:]
    assert sum("ignored (MindSpore/Ascend-only): " in line for line in p.stderr.splitlines()) == 1, p.stderr
