"""`dsv3 info --config` takes the seed's MindSpore YAMLs as the other verbs do (issue 26 item 6): the pretrain and
finetune YAMLs' model_config / moe_config as `dsv3 train` reads them, the predict YAMLs' with their YaRN
`scaling_factor`; the 671B model's counts come out of each."""

from __future__ import annotations

import subprocess
import sys

import pytest

YAMLS = ("pretrain_deepseek3_671b.yaml", "finetune_deepseek3_671b.yaml", "predict_deepseek3_671b.yaml",
         "predict_deepseek3_671b_w8a8.yaml")


@pytest.mark.parametrize("name", YAMLS)
def test_info_reads_the_seed_yaml(data_dir, name):
    src = data_dir.parent / "mindformers-configs" / name
    if not src.is_file():
        pytest.skip(f"{src} not found")
    r = subprocess.run([sys.executable, "-m", "dsv3", "info", "--config", str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "671.03B" in r.stdout and "37.55B" in r.stdout, r.stdout
    from dsv3.config.presets import load_model_config

    cfg = load_model_config(src)
    assert (cfg.num_hidden_layers, cfg.n_routed_experts, cfg.vocab_size) == (61, 256, 129280)
    if name.startswith("predict"):  # inference on the released weights: YaRN x40 over 4096, as the YAML says
        assert cfg.rope_scaling.factor == 40.0 and cfg.rope_scaling.original_max_position_embeddings == 4096
