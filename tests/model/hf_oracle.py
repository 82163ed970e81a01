"""The test oracle: tiny transformers `DeepseekV3ForCausalLM` checkpoints with every weight random.

transformers' own init zeroes the router bias and sets norms to one, which would hide bugs in the
bias and norm handling, so `randomize_` draws every parameter and buffer (router bias included,
small and often negative so the group choice depends on it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BASE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    max_position_embeddings=128, num_nextn_predict_layers=0, tie_word_embeddings=False,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
)
"""A tiny V3: YaRN with original context 32 so test sequences of ~80 tokens go beyond it."""


def hf_config(**overrides):
    from transformers import DeepseekV3Config

    kw = {**BASE, **overrides}
    cfg = DeepseekV3Config(**kw)
    cfg._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def randomize_(model: torch.nn.Module, std: float = 0.08, seed: int = 0) -> torch.nn.Module:
    """Every parameter and persistent buffer random: norms around 1, matrices N(0, std), router bias N(0, 0.05)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "inv_freq" in name or "tokens_per_expert" in name or t.numel() == 0:
            continue
        r = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if name.endswith("e_score_correction_bias"):
            t.copy_(0.05 * r)
        elif "norm" in name:
            t.copy_(1.0 + 0.1 * r)
        else:
            t.copy_(std * r)
    return model


def make_hf_checkpoint(path: Path, max_shard_size: str = "40KB", seed: int = 0, **overrides):
    """Random transformers model saved with its own save_pretrained (sharded). Returns the model (eval)."""
    from transformers import DeepseekV3ForCausalLM

    return _save_random(DeepseekV3ForCausalLM, hf_config(**overrides), path, max_shard_size, seed)


def _save_random(model_cls, cfg, path: Path, max_shard_size: str, seed: int):
    torch.manual_seed(seed)
    model = model_cls(cfg).float()
    randomize_(model, seed=seed)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return model.eval()


def add_mtp_layer(path: Path, hf_model, seed: int = 1) -> dict[str, torch.Tensor]:
    """Append MTP layer `num_hidden_layers` (hub names) to a saved checkpoint as an extra shard.

    The block's tensors come from a freshly randomised transformers decoder layer (so their names
    and shapes are exactly transformers'); the embed/head copies equal the main ones. Returns the
    tensors written (HF names).
    """
    from safetensors.torch import save_file
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    cfg = hf_model.config
    n, D = cfg.num_hidden_layers, cfg.hidden_size
    g = torch.Generator().manual_seed(seed)
    layer = randomize_(DeepseekV3DecoderLayer(cfg, layer_idx=max(n, cfg.first_k_dense_replace)).float(), seed=seed)
    p = f"model.layers.{n}."
    tensors = {p + k: v.detach().clone() for k, v in layer.state_dict().items()}
    # transformers keeps fused experts in memory; the hub layout is per expert
    for k in [k for k in tensors if k.endswith("mlp.experts.gate_up_proj")]:
        gate_up = tensors.pop(k)
        down = tensors.pop(k.replace("gate_up_proj", "down_proj"))
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            tensors[f"{p}mlp.experts.{e}.gate_proj.weight"] = gate_up[e, :inter].clone()
            tensors[f"{p}mlp.experts.{e}.up_proj.weight"] = gate_up[e, inter:].clone()
            tensors[f"{p}mlp.experts.{e}.down_proj.weight"] = down[e].clone()
    tensors[p + "enorm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    tensors[p + "hnorm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    tensors[p + "eh_proj.weight"] = 0.08 * torch.randn(D, 2 * D, generator=g)
    tensors[p + "shared_head.norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    tensors[p + "embed_tokens.weight"] = hf_model.model.embed_tokens.weight.detach().clone()
    tensors[p + "shared_head.head.weight"] = hf_model.lm_head.weight.detach().clone()
    fname = "model-mtp.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / fname), metadata={"format": "pt"})
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({k: fname for k in tensors})
    index_path.write_text(json.dumps(index))
    conf = json.loads((path / "config.json").read_text())
    conf["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(conf))
    return tensors


V32_INDEX = dict(index_topk=8, index_n_heads=8, index_head_dim=16)
"""A tiny DeepSeek Sparse Attention indexer: 8 keys per query, so sequences of 40+ tokens are sparse."""


def hf_v32_config(**overrides):
    """transformers' DeepseekV32Config for BASE (+ V32_INDEX) with the overrides (legacy `rope_scaling`
    dicts are turned into v5 `rope_parameters`)."""
    from transformers import DeepseekV32Config

    kw = {**BASE, **V32_INDEX, **overrides}
    rs = kw.pop("rope_scaling")
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rs is not None:
        rope = {**{k: v for k, v in rs.items() if k != "type"}, "rope_type": "yarn", "rope_theta": 10000.0}
    kw.pop("num_nextn_predict_layers", None)
    cfg = DeepseekV32Config(**kw, rope_parameters=rope)
    cfg._attn_implementation = "eager"
    return cfg


def make_hf_v32_checkpoint(path: Path, max_shard_size: str = "40KB", seed: int = 0, **overrides):
    """Random transformers `DeepseekV32ForCausalLM` saved with its own save_pretrained. Returns the model (eval)."""
    from transformers import DeepseekV32ForCausalLM

    return _save_random(DeepseekV32ForCausalLM, hf_v32_config(**overrides), path, max_shard_size, seed)
