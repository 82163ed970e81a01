"""Logits parity with transformers' DeepseekV3ForCausalLM (the oracle), through our HF loader.

Each variant: a random transformers model saved with its own `save_pretrained` (many small shards),
loaded with `dsv3.from_pretrained`, compared in fp32 on sequences longer than YaRN's
`original_max_position_embeddings` (32 here), so the YaRN frequencies and mscale² matter.
"""

from __future__ import annotations

import pytest
import torch

import dsv3
from hf_oracle import make_hf_checkpoint

YARN_V2_LITE = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

VARIANTS = {
    "v3_like": dict(),  # q_lora, norm_topk_prob, 4 groups keep 2, 1 dense layer, 1 shared expert
    "no_qlora_nonorm_1group_dense0_shared2": dict(q_lora_rank=None, norm_topk_prob=False, n_group=1, topk_group=1,
                                                  first_k_dense_replace=0, n_shared_experts=2),
    "2groups_dense2_shared0": dict(n_group=2, topk_group=1, first_k_dense_replace=2, n_shared_experts=0),
    "8groups_keep3_top3_mscale": dict(n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=3,
                                      rope_scaling=YARN_V2_LITE),
    "top1_noyarn": dict(num_experts_per_tok=1, rope_scaling=None, q_lora_rank=None),
    "yarn_untruncated_attention_factor": dict(rope_scaling={**YARN_V2_LITE, "truncate": False, "attention_factor": 1.2}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(tmp_path, name):
    hf = make_hf_checkpoint(tmp_path, max_shard_size="40KB", **VARIANTS[name])
    assert len(list(tmp_path.glob("*.safetensors"))) > 3  # really sharded
    model = dsv3.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (2, 80))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert out.shape == ref.shape == (2, 80, hf.config.vocab_size)
    assert (out - ref).abs().max().item() <= 1e-4
    # positions beyond the original context differ from a model without YaRN: the test can see rope bugs
    assert ref[:, 40:].abs().max() > 0.1


def test_absorbed_and_loop_paths_also_match(tmp_path):
    hf = make_hf_checkpoint(tmp_path)
    model = dsv3.from_pretrained(tmp_path, dtype=torch.float32, attn_impl="absorb", moe_impl="loop")
    ids = torch.randint(0, hf.config.vocab_size, (1, 70))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_random_bias_changes_routing(tmp_path):
    """The router bias is random in these tests; zeroing it changes the logits (it is really used)."""
    hf = make_hf_checkpoint(tmp_path)
    model = dsv3.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (1, 64))
    with torch.no_grad():
        before = model(ids)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.zero_()
        after = model(ids)
    assert (before - after).abs().max() > 1e-3
