"""HF `config.json` <-> ModelConfig.

Our field names are the HF ones, so the map is mostly identity; this module handles the
differences: `rope_scaling` (legacy) vs `rope_parameters` (transformers v5), ints stored for
floats, architectures that are not DeepSeek-V3, and keys that only HF uses.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dsv3.config.load import from_dict
from dsv3.config.schema import ModelConfig, RopeScaling
from dsv3.errors import UserError

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v32", "deepseek_v2", "kimi_k2")
SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM", "DeepseekV2ForCausalLM")
V32_INDEX_DEFAULTS = {"index_topk": 2048, "index_n_heads": 64, "index_head_dim": 128}
"""transformers' DeepseekV32Config defaults, applied when a deepseek_v32 config.json omits them."""

# HF keys with no meaning for our model maths (accepted and dropped).
_IGNORED_HF_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "num_key_value_heads",
    "hidden_act", "attention_bias", "attention_dropout", "use_cache", "ep_size", "seq_aux",
    "pretraining_tp", "rope_interleave", "head_dim", "quantization_config", "dtype",
    "output_router_logits", "router_aux_loss_coef", "_name_or_path", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_return_dict", "id2label",
    "label2id", "problem_type", "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward",
    "tokenizer_class", "generation_config", "num_local_experts", "n_local_experts",
    "layer_types", "mlp_bias",
}
RUNTIME_FIELDS = ("attn_impl", "moe_impl", "mtp_hidden", "index_impl")
"""ModelConfig switches that are not architecture (never read from or written to config.json)."""
_ARCH_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - set(RUNTIME_FIELDS)
_ROPE_KEYS = {f.name for f in dataclasses.fields(RopeScaling)}


def _rope_from_hf(hf: dict) -> tuple[RopeScaling | None, float | None]:
    rp = hf.get("rope_parameters") or hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if not rp:
        return None, theta
    rp = dict(rp)
    theta = rp.pop("rope_theta", theta)
    rtype = rp.pop("rope_type", None) or rp.pop("type", None) or "default"
    rp.pop("type", None)
    rp.pop("partial_rotary_factor", None)
    if rtype == "default":
        return None, theta
    if rtype not in ("yarn", "deepseek_yarn"):
        raise UserError(f"rope type {rtype!r} is not supported (expected 'yarn')")
    kwargs = {k: v for k, v in rp.items() if k in _ROPE_KEYS}
    kwargs["type"] = "yarn"
    if "mscale" not in rp:
        kwargs["mscale"] = None
    if "mscale_all_dim" not in rp:
        kwargs["mscale_all_dim"] = None
    if "original_max_position_embeddings" not in kwargs:
        kwargs["original_max_position_embeddings"] = hf.get("max_position_embeddings", 4096)
    if kwargs.get("factor") is None:  # HF derives it from the two context lengths
        kwargs["factor"] = hf.get("max_position_embeddings", 4096) / kwargs["original_max_position_embeddings"]
    unknown = set(rp) - _ROPE_KEYS - {"original_max_position_embeddings"}
    if unknown:
        raise UserError(f"rope scaling keys {sorted(unknown)} are not supported (known: {sorted(_ROPE_KEYS)})")
    for k in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
        if kwargs.get(k) is not None:
            kwargs[k] = float(kwargs[k])
    return from_dict(RopeScaling, kwargs, "rope_scaling"), theta


def from_hf_dict(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a parsed HF config dict; non-DeepSeek architectures are rejected."""
    mtype = hf.get("model_type")
    archs = hf.get("architectures") or []
    if mtype not in SUPPORTED_MODEL_TYPES and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UserError(
            f"{source}: model_type {mtype!r} / architectures {archs} is not a DeepSeek-V3 model "
            f"(expected model_type in {SUPPORTED_MODEL_TYPES})"
        )
    try:
        rope, theta = _rope_from_hf(hf)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    kwargs: dict[str, Any] = {}
    for k, v in hf.items():
        if k in ("rope_scaling", "rope_parameters", "rope_theta") or k in _IGNORED_HF_KEYS:
            continue
        if k == "torch_dtype" and v is not None:
            kwargs[k] = str(v).replace("torch.", "")
        elif k in _ARCH_FIELDS:
            kwargs[k] = v
    if "dtype" in hf and "torch_dtype" not in hf and hf["dtype"]:
        kwargs["torch_dtype"] = str(hf["dtype"]).replace("torch.", "")
    is_v32 = mtype == "deepseek_v32" or "DeepseekV32ForCausalLM" in archs
    if is_v32:
        for k, v in V32_INDEX_DEFAULTS.items():
            kwargs.setdefault(k, v)
    elif kwargs.get("index_topk"):
        raise UserError(f"{source}: index_topk is set but model_type is {mtype!r} (sparse attention is deepseek_v32)")
    _check_mlp_layer_types(hf, source)
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    for k in ("routed_scaling_factor", "rms_norm_eps", "initializer_range", "aux_loss_alpha"):
        if isinstance(kwargs.get(k), int):
            kwargs[k] = float(kwargs[k])
    if mtype == "deepseek_v2" and "topk_method" not in hf:
        kwargs["topk_method"] = "greedy"
    if mtype == "deepseek_v2" and hf.get("scoring_func") is None:  # V2 routes by softmax (transformers omits the key)
        kwargs["scoring_func"] = "softmax"
    if kwargs.get("topk_method") == "noaux_tc" and "scoring_func" not in hf:
        kwargs["scoring_func"] = "sigmoid"
    if kwargs.get("num_nextn_predict_layers") is None:
        kwargs["num_nextn_predict_layers"] = 0
    if kwargs.get("n_shared_experts") is None:
        kwargs["n_shared_experts"] = 0
    if kwargs.get("n_group") is None:
        kwargs["n_group"] = 1
    if kwargs.get("topk_group") is None:
        kwargs["topk_group"] = 1
    if kwargs.get("pad_token_id") is not None and not isinstance(kwargs["pad_token_id"], int):
        kwargs["pad_token_id"] = None
    kwargs["rope_scaling"] = rope
    if theta is not None:
        kwargs["rope_theta"] = float(theta)
    try:
        return from_dict(ModelConfig, kwargs, "")
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def _check_mlp_layer_types(hf: dict, source: str) -> None:
    """transformers' V3.2 config may spell the dense/MoE pattern out; it must be the one
    `first_k_dense_replace` (and `moe_layer_freq`) describe, since that is what the model builds."""
    types = hf.get("mlp_layer_types")
    if types is None:
        return
    n, k, freq = hf.get("num_hidden_layers"), hf.get("first_k_dense_replace", 3), hf.get("moe_layer_freq", 1) or 1
    if not isinstance(n, int) or not isinstance(k, int) or not isinstance(freq, int):
        return  # the dataclass check reports the bad size itself
    want = ["sparse" if i >= k and i % freq == 0 else "dense" for i in range(n)]
    if types != want:
        raise UserError(f"{source}: mlp_layer_types {types} does not match first_k_dense_replace {k} "
                        f"(expected {want})")


def load_hf_config(path: str | Path) -> ModelConfig:
    """Read `config.json` (a file or a checkpoint directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UserError(f"no config.json at {p}")
    try:
        hf = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{p}: expected a JSON object")
    return from_hf_dict(hf, str(p))


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> HF `config.json` dict (loadable by transformers): DeepseekV3, or DeepseekV32 with sparse attention."""
    if cfg.sparse_attention:
        out: dict[str, Any] = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32"}
    else:
        out = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    for f in dataclasses.fields(cfg):
        if f.name in RUNTIME_FIELDS or f.name == "rope_scaling":
            continue
        if f.name.startswith("index_") and not cfg.sparse_attention:  # (index_impl: a runtime switch, above)
            continue
        out[f.name] = getattr(cfg, f.name)
    out["num_key_value_heads"] = cfg.num_attention_heads
    out["hidden_act"] = "silu"
    out["attention_bias"] = False
    out["rope_interleave"] = True
    if cfg.rope_scaling is not None:
        rs = dataclasses.asdict(cfg.rope_scaling)
        rs = {k: v for k, v in rs.items() if v is not None}
        out["rope_scaling"] = rs
    else:
        out["rope_scaling"] = None
    return out


def save_hf_config(cfg: ModelConfig, directory: str | Path) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "config.json.tmp"
    tmp.write_text(json.dumps(to_hf_dict(cfg), indent=2) + "\n", encoding="utf-8")
    tmp.replace(d / "config.json")
