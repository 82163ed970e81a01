"""FP8 checkpoints: `dsv3 convert --to fp8` against DeepSeek's published algorithm, bit for bit, and
an FP8 directory served as FP8 (1 byte per weight resident) with the logits of its dequantisation."""

from __future__ import annotations

import json
import re

import pytest
import torch

import dsv3
from dsv3 import LLM, SamplingParams
from dsv3.checkpoint.reader import CheckpointReader
from dsv3.cli import main
from dsv3.quant import QuantExperts, QuantLinear, quant_bytes

# the matrices DeepSeek-V3's release stores in FP8: attention, dense MLP, shared and routed experts (MTP too)
FP8_WEIGHT = re.compile(r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)|"
                        r"mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$")


def reference_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The published algorithm, block by block: s = amax(|block|) / 448, q = (w / s).to(float8_e4m3fn)."""
    w = w.float()
    M, N = w.shape
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn)
    s = torch.empty(-(-M // 128), -(-N // 128))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            s[i, j] = block.abs().max() / 448
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (block / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


@pytest.fixture(scope="module")
def fp8_dir(small_ckpt, tmp_path_factory):
    dst = tmp_path_factory.mktemp("fp8") / "out"
    assert main(["convert", str(small_ckpt), str(dst), "--to", "fp8", "--max-shard-size", "2MB"]) == 0
    return dst


def test_convert_to_fp8_matches_reference_quantiser(small_ckpt, fp8_dir):
    src, out = CheckpointReader(small_ckpt), CheckpointReader(fp8_dir)
    n_fp8 = 0
    for name in src.names():
        t = src.tensor(name)
        if FP8_WEIGHT.search(name):
            q, s = reference_quant(t)
            got = out.tensor(name)
            assert got.dtype == torch.float8_e4m3fn, name
            assert torch.equal(got.view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(out.tensor(name + "_scale_inv"), s), name
            n_fp8 += 1
        else:  # embedding, lm_head, norms, router weight, MTP eh_proj / enorm / hnorm: unquantised
            assert name + "_scale_inv" not in out.meta, name
            want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
            assert out.tensor(name).dtype == want and torch.equal(out.tensor(name), t.to(want)), name
    assert set(out.meta) == set(src.meta) | {n + "_scale_inv" for n in src.meta if FP8_WEIGHT.search(n)}
    layers = json.loads((fp8_dir / "config.json").read_text())
    assert n_fp8 > 0 and any(n.startswith("model.layers.4.") and FP8_WEIGHT.search(n) for n in out.meta)  # the MTP layer
    assert layers["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}


def test_fp8_dir_loads_as_fp8_with_dequantised_logits(fp8_dir):
    m = dsv3.from_pretrained(fp8_dir, dtype=torch.float32)
    dense = dsv3.from_pretrained(fp8_dir, dtype=torch.float32, quantization="none")
    assert isinstance(m.model.layers[0].self_attn.kv_b_proj, QuantLinear)
    assert isinstance(m.model.layers[1].mlp.experts, QuantExperts) and isinstance(m.model.mtp[0].block.mlp.experts, QuantExperts)
    assert m.model.layers[1].mlp.experts.gate_proj.dtype == torch.float8_e4m3fn
    assert isinstance(m.lm_head, torch.nn.Linear) and isinstance(m.model.mtp[0].eh_proj, torch.nn.Linear)
    nbytes, nweights = quant_bytes(m)
    fp8_leaves = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert nweights == sum(p.numel() for n, p in dense.named_parameters() if fp8_leaves & set(n.split(".")))
    assert nbytes / nweights <= 1.1, nbytes / nweights
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        a, b = m(ids), dense(ids)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
    # casting the model keeps FP8 storage and fp32 scales
    m.to(torch.bfloat16)
    kv_b = m.model.layers[0].self_attn.kv_b_proj
    assert kv_b.weight.dtype == torch.float8_e4m3fn and kv_b.weight_scale_inv.dtype == torch.float32


def test_llm_serves_fp8_dir_as_fp8(fp8_dir):
    prompt = [3, 17, 99, 250, 7, 8]
    sp = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=6)
    llm = LLM(str(fp8_dir), dtype="float32", num_gpu_blocks=16)
    assert llm.engine.model.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.float8_e4m3fn
    dense = LLM(str(fp8_dir), dtype="float32", num_gpu_blocks=16, quantization="none")
    assert llm.generate(prompt, sp)[0].outputs[0].token_ids == dense.generate(prompt, sp)[0].outputs[0].token_ids


def test_on_the_fly_fp8_equals_converted(small_ckpt, fp8_dir):
    """quantization="fp8" on a dense checkpoint gives the same weights as `convert --to fp8`."""
    a = dsv3.from_pretrained(small_ckpt, dtype=torch.float32, quantization="fp8")
    b = dsv3.from_pretrained(fp8_dir, dtype=torch.float32)
    qa, qb = a.model.layers[2].mlp.experts, b.model.layers[2].mlp.experts
    assert torch.equal(qa.down_proj.view(torch.uint8), qb.down_proj.view(torch.uint8))
    assert torch.equal(qa.down_proj_scale_inv, qb.down_proj_scale_inv)
