"""Quantising a whole model from outside: fast vs reference logits, the engine's absorbed-MLA path,
module selection (the seed's W8A8 quantization_config), `LLM(quantization=)`, offline `convert --quantize`."""

from __future__ import annotations

import copy

import pytest
import torch

import dsv3
from dsv3 import LLM, SamplingParams
from dsv3.cli import main
from dsv3.errors import UserError
from dsv3.quant import QuantConfig, QuantExperts, QuantLinear, quantize_model, set_reference

from quant_helpers import greedy, small_model

SEED_W8A8 = {  # model.model_config.quantization_config of the seed's predict_deepseek3_671b_w8a8.yaml
    "quant_method": "ptq", "weight_dtype": "int8", "activation_dtype": "int8", "kvcache_dtype": "none",
    "outliers_suppression": "outlier-suppression+", "modules_to_not_convert": ["lm_head", "w2", "lkv2kv"],
    "algorithm_args": {},
    "layer_policies": {r".*\.feed_forward\..*": {
        "quant_method": "ptq", "activation_dtype": "int8", "weight_dtype": "int8", "kvcache_dtype": "none",
        "act_quant_granularity": "per_token", "weight_quant_granularity": "per_channel", "outliers_suppression": "None",
        "modules_to_not_convert": [], "algorithm_args": {}}},
}


@pytest.fixture(scope="module")
def dense():
    return small_model()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method", ["int8", "w8a8", "int4", "fp8"])
def test_model_fast_equals_reference_and_engine(dense, method):
    # fast vs reference through a whole model without routing (4 dense layers): in a random MoE a
    # round-off difference can flip an expert choice, which says nothing about the GEMMs
    mlp_only = small_model(first_k_dense_replace=4)
    q = copy.deepcopy(mlp_only)
    quantize_model(q, QuantConfig.preset(method))
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        fast = q(ids)
        set_reference(q)
        ref = q(ids)
        full = mlp_only(ids)
    # W8A8: round-off can move an activation across an int8 rounding step; int8 (decode rows) and
    # int4 kernels take bf16 activations and return bf16
    assert _rel(fast, ref) < (1e-4 if method == "fp8" else 2e-2), _rel(fast, ref)
    bound = {"int8": 0.05, "w8a8": 0.05, "fp8": 0.2, "int4": 0.5}[method]  # e4m3 keeps 3 mantissa bits, int4 16 levels
    assert _rel(fast, full) < bound  # a sanity bound on random weights (accuracy: test_quant_accuracy)
    m = copy.deepcopy(dense)
    report = quantize_model(m, QuantConfig.preset(method))
    assert report.converted[method] > 0 and not report.unsupported
    # the engine (paged latent cache, absorbed MLA from the dense kv_b view) decodes like the model itself
    prompt = ids[0, :8].tolist()
    llm = LLM(m, num_gpu_blocks=16)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, min_tokens=6))[0].outputs[0].token_ids
    assert out == greedy(m, prompt, 6)


def test_seed_w8a8_config_selects_modules(dense):
    qc = QuantConfig.from_mindformers(SEED_W8A8)
    assert qc.method == "w8a8" and set(qc.modules_to_not_convert) == {"lm_head", "down_proj", "kv_b_proj"}
    assert any("outlier-suppression+" in n and "NOT applied" in n for n in qc.notes)
    m = copy.deepcopy(dense)
    quantize_model(m, qc)
    attn, mlp, moe = m.model.layers[0].self_attn, m.model.layers[0].mlp, m.model.layers[1].mlp
    assert isinstance(m.lm_head, torch.nn.Linear) and isinstance(attn.kv_b_proj, torch.nn.Linear)  # lm_head, lkv2kv
    assert isinstance(attn.q_a_proj, QuantLinear) and isinstance(attn.o_proj, QuantLinear)
    # the feed_forward policy (modules_to_not_convert: []) converts w2 = down_proj inside the MLPs
    assert isinstance(mlp.down_proj, QuantLinear) and isinstance(moe.shared_experts.down_proj, QuantLinear)
    assert isinstance(moe.experts, QuantExperts) and moe.experts.down_proj.dtype == torch.int8
    assert isinstance(moe.gate, torch.nn.Module) and moe.gate.weight.dtype == torch.float32  # the router stays dense


@pytest.mark.parametrize("bad, word", [
    ({**SEED_W8A8, "kvcache_dtype": "int8"}, "kvcache_dtype"),
    ({**SEED_W8A8, "modules_to_not_convert": ["wq_fancy"]}, "wq_fancy"),
    ({**SEED_W8A8, "weight_dtype": "int4"}, "weight_dtype"),
    ({**SEED_W8A8, "smooth": True}, "unknown keys"),
])
def test_unsupported_quantization_config_is_refused(bad, word):
    with pytest.raises(UserError, match=word):
        QuantConfig.from_mindformers(bad)


def test_cast_keeps_int_storage(dense):
    m = copy.deepcopy(dense)
    quantize_model(m, QuantConfig.preset("int8"))
    m.to(torch.bfloat16)
    lin = m.model.layers[0].self_attn.q_b_proj
    assert lin.weight.dtype == torch.int8 and lin.weight_scale_inv.dtype == torch.bfloat16
    with torch.no_grad():
        assert m(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_offline_w8a8_checkpoint_loads_like_quantising_at_load(small_ckpt, tmp_path, capsys):
    dst = tmp_path / "w8a8"
    assert main(["convert", str(small_ckpt), str(dst), "--quantize", "w8a8"]) == 0
    stored = dsv3.from_pretrained(dst, dtype=torch.float32)
    at_load = dsv3.from_pretrained(small_ckpt, dtype=torch.float32, quantization="w8a8")
    a, b = stored.model.layers[1].mlp.experts, at_load.model.layers[1].mlp.experts
    assert isinstance(a, QuantExperts) and a.scheme.name == "w8a8" and torch.equal(a.up_proj, b.up_proj)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.allclose(stored(ids), at_load(ids), rtol=1e-5, atol=1e-6)


def test_quantised_model_refuses_save_pretrained(dense, tmp_path):
    m = copy.deepcopy(dense)
    quantize_model(m, QuantConfig.preset("int8"))
    with pytest.raises(UserError, match="dsv3 convert"):
        m.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_int4_group_size_and_errors(small_ckpt):
    m = dsv3.from_pretrained(small_ckpt, dtype=torch.float32, quantization="int4:64")
    assert m.model.layers[0].self_attn.q_a_proj.scheme.group == 64
    for bad in ("int3", "int8:64", "int4:48"):
        with pytest.raises(UserError):
            dsv3.from_pretrained(small_ckpt, quantization=bad)
