"""Typed configs: presets, strict loading, overrides, HF config.json import/export."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dsv3.config.hf import from_hf_dict, load_hf_config, save_hf_config, to_hf_dict
from dsv3.config.load import apply_overrides, from_dict, to_dict
from dsv3.config.presets import CONFIG_DIR, load_model_config
from dsv3.config.schema import ModelConfig, RopeScaling
from dsv3.errors import UserError


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_with_a_model_section_loads(path):
    from dsv3.config.load import read_yaml

    if "model" not in read_yaml(path):
        pytest.skip("no model section")
    cfg = load_model_config(path)
    assert isinstance(cfg, ModelConfig) and cfg.hidden_size > 0


def test_presets_match_the_published_values():
    big = load_model_config("deepseek_v3_671b")
    assert (big.hidden_size, big.num_hidden_layers, big.n_routed_experts, big.num_experts_per_tok) == (7168, 61, 256, 8)
    assert abs(big.softmax_scale - 0.1352338) < 1e-6  # 192^-0.5 * mscale(40, 1)^2
    seed = load_model_config("deepseek_v3_1b")
    assert (seed.hidden_size, seed.num_hidden_layers, seed.num_attention_heads, seed.n_routed_experts,
            seed.first_k_dense_replace, seed.moe_intermediate_size, seed.intermediate_size, seed.q_lora_rank,
            seed.kv_lora_rank, seed.qk_rope_head_dim, seed.qk_nope_head_dim, seed.v_head_dim, seed.vocab_size,
            seed.num_nextn_predict_layers, seed.bos_token_id, seed.eos_token_id) == (
        2048, 3, 8, 16, 1, 2048, 6144, 1536, 512, 64, 128, 128, 129280, 1, 0, 1)


def test_unknown_key_names_it_and_the_valid_ones():
    with pytest.raises(UserError, match=r"unknown key 'model.hidden_sise'.*hidden_size"):
        from_dict(ModelConfig, {"hidden_sise": 3}, "model")


def test_wrong_type_is_named():
    with pytest.raises(UserError, match="model.num_hidden_layers: expected an integer"):
        from_dict(ModelConfig, {"num_hidden_layers": "four"}, "model")


def test_set_overrides_are_typed(tmp_path):
    cfg = load_model_config("tiny", ["model.num_hidden_layers=2", "model.rope_scaling.factor=8"])
    assert cfg.num_hidden_layers == 2 and cfg.rope_scaling.factor == 8.0
    with pytest.raises(UserError, match="expected a number"):
        load_model_config("tiny", ["model.rope_scaling.factor=big"])
    assert apply_overrides({}, ["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}


def test_invalid_combination_is_a_user_error():
    with pytest.raises(UserError, match="not divisible by n_group"):
        from_dict(ModelConfig, {"n_routed_experts": 10, "n_group": 4}, "model")


def test_hf_config_round_trip_through_transformers(tmp_path):
    from transformers import DeepseekV3Config

    cfg = load_model_config("tiny")
    save_hf_config(cfg, tmp_path)
    hf = DeepseekV3Config.from_pretrained(tmp_path)
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == cfg.rope_scaling.factor
    assert hf.num_nextn_predict_layers == cfg.num_nextn_predict_layers and hf.q_lora_rank == cfg.q_lora_rank
    # and back, from the file transformers writes (v5 `rope_parameters`, ints for floats)
    hf.save_pretrained(tmp_path / "tf")
    again = load_hf_config(tmp_path / "tf")
    skip = {"attn_impl", "moe_impl", "mtp_hidden", "aux_loss_alpha", "moe_layer_freq", "scoring_func", "topk_method", "initializer_range", "torch_dtype"}
    for f in dataclasses.fields(ModelConfig):
        if f.name not in skip:
            assert getattr(again, f.name) == getattr(cfg, f.name), f.name


def test_hub_style_config_json():
    """The hub's legacy `rope_scaling` with int fields, V2-Lite's q_lora_rank null, eos as a list."""
    hub = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 64,
           "q_lora_rank": None, "eos_token_id": [1], "rope_theta": 10000,
           "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
           "quantization_config": {"quant_method": "fp8"}, "n_routed_experts": 8, "n_group": 2, "topk_group": 1,
           "num_experts_per_tok": 2}
    cfg = from_hf_dict(hub)
    assert cfg.q_lora_rank is None and cfg.eos_token_id == 1 and cfg.rope_scaling == RopeScaling(factor=40.0)
    assert "quantization_config" not in to_hf_dict(cfg)


def test_non_deepseek_config_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match="not a DeepSeek-V3 model"):
        load_hf_config(tmp_path)
    with pytest.raises(UserError, match="no config.json"):
        load_hf_config(tmp_path / "nope")


def test_to_dict_is_yaml_ready():
    d = to_dict(load_model_config("tiny"))
    assert d["rope_scaling"]["factor"] == 4.0 and isinstance(d["rope_scaling"], dict)


@pytest.mark.parametrize("preset", ["deepseek_v3_1b", "tiny"])
def test_exported_config_json_carries_the_routing_llama_cpp_reads(preset, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py reads scoring_func / topk_method from config.json and routes
    with softmax when they are missing (transformers' save_pretrained drops them): dsv3's export
    (save_hf_config, and Transformer.save_pretrained which bench/make_random_model.py uses) keeps them."""
    import torch

    from dsv3.model.transformer import Transformer

    cfg = load_model_config(preset)
    save_hf_config(cfg, tmp_path / "cfg")
    written = [json.loads((tmp_path / "cfg" / "config.json").read_text())]
    if preset == "tiny":
        with torch.device("meta"):
            model = Transformer(cfg)
        model.to_empty(device="cpu")
        model.save_pretrained(tmp_path / "model")
        written.append(json.loads((tmp_path / "model" / "config.json").read_text()))
    for hf in written:
        assert (hf["scoring_func"], hf["topk_method"]) == (cfg.scoring_func, cfg.topk_method) == ("sigmoid", "noaux_tc")
        assert hf["n_group"] == cfg.n_group and hf["routed_scaling_factor"] == cfg.routed_scaling_factor
