"""MindFormers predict YAML (`dsv3 generate --config predict_*.yaml`) -> the settings `dsv3 generate` applies."""

from __future__ import annotations

import sys
from typing import Any

from dsv3.config.mindspore_keys import _group
from dsv3.errors import UserError

_PREDICT_SAMPLING = ("do_sample", "top_k", "top_p", "repetition_penalty")
PREDICT_MAX_NEW_TOKENS = 128
"""`run_predict_deepseek.py` calls `generate(..., max_new_tokens=128)`; MindFormers then stops at prompt + 128
tokens whatever the YAML's max_decode_length."""
_PREDICT_WHY = {
    "max_decode_length": f"run_predict_deepseek.py's max_new_tokens={PREDICT_MAX_NEW_TOKENS} takes precedence; --max-tokens N to change",
    "block_size": "the KV cache is set by --block-size / --num-blocks",
    "num_blocks": "the KV cache is set by --block-size / --num-blocks",
    "parallel_config": "use_parallel is not True: one process",
}
_PREDICT_PARALLEL = ("data_parallel", "model_parallel", "pipeline_stage", "expert_parallel")  # -> tp / ep (dsv3 generate)
_PREDICT_OPEN = ("model", "model.model_config", "processor", "processor.tokenizer")  # sections listed key by key


def predict_settings(data: dict, source: str = "config", quiet: bool = False) -> dict[str, Any]:
    """The fields of a MindFormers predict YAML that `dsv3 generate` applies (checkpoint, tokenizer,
    seed, sampling). Every other key is listed once on stderr as not applied, never dropped silently."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping at the top level")
    mc = (data.get("model") or {}).get("model_config") or {}
    tok = (data.get("processor") or {}).get("tokenizer") or {}
    out: dict[str, Any] = {"model": data.get("load_checkpoint"), "tokenizer": tok.get("tokenizer_file") or tok.get("vocab_file"),
                           "seed": data.get("seed")}
    out["max_tokens"] = PREDICT_MAX_NEW_TOKENS
    if mc.get("do_sample"):
        out["temperature"] = 1.0
        if mc.get("top_k") not in (None, 0):
            out["top_k"] = int(mc["top_k"])
        if mc.get("top_p") not in (None, 1):
            out["top_p"] = float(mc["top_p"])
    if mc.get("repetition_penalty") not in (None, 1):
        out["repetition_penalty"] = float(mc["repetition_penalty"])
    if not out["model"]:
        raise UserError(f"{source}: no load_checkpoint (the checkpoint directory or file)")
    if not isinstance(out["model"], str):
        raise UserError(f"{source}: load_checkpoint is a {type(out['model']).__name__}, expected a path (the checkpoint directory or file)")
    if mc.get("quantization_config"):  # applied by `dsv3 generate` (dsv3.quant.QuantConfig.from_mindformers)
        out["quantization_config"] = mc["quantization_config"]
    used = {"model.model_config.quantization_config", "load_checkpoint", "seed", "processor.tokenizer.tokenizer_file", "processor.tokenizer.vocab_file",
            "model.arch", "use_parallel", *(f"model.model_config.{k}" for k in _PREDICT_SAMPLING)}
    open_sections = _PREDICT_OPEN
    if data.get("use_parallel") and isinstance(data.get("parallel_config"), dict):  # MindFormers: else one device
        pc = data["parallel_config"]
        out["parallel"] = {k: int(pc.get(k) or 1) for k in _PREDICT_PARALLEL}
        used |= {f"parallel_config.{k}" for k in _PREDICT_PARALLEL}
        open_sections = (*_PREDICT_OPEN, "parallel_config")
    unused: list[str] = []

    def visit(node: dict, where: str) -> None:
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if path in used:
                continue
            if path in open_sections and isinstance(value, dict):
                visit(value, path)
            else:
                unused.append(path + (f" ({_PREDICT_WHY[key]})" if key in _PREDICT_WHY else ""))

    visit(data, "")
    if unused and not quiet:
        print(f"{source}: not applied by dsv3 generate (the model's architecture comes from the checkpoint's config.json, "
              f"the rest is MindSpore/Ascend-only): {_group(unused)}", file=sys.stderr)
    return out


_PREDICT_ONLY = (*_PREDICT_SAMPLING, "max_decode_length", "block_size", "num_blocks", "use_past", "is_dynamic", "ffn_concat", "auto_map",
                 "quantization_config", "scaling_factor", "extend_method")
"""model_config keys of a predict YAML that are no part of the architecture (generation, cache, quantisation, RoPE)."""


def predict_model(data: dict, source: str = "config") -> dict:
    """Our `model:` section from a MindFormers predict YAML (`dsv3 info --config predict.yaml`): its model_config
    and moe_config read as `translate` reads a training YAML's, `extend_method: YARN` with `scaling_factor` as
    rope_scaling; the generation, cache and quantisation keys are skipped."""
    from dsv3.config.mindspore import translate

    mc = dict((data.get("model") or {}).get("model_config") or {})
    yarn = str(mc.get("extend_method")).upper() == "YARN"
    scaling = mc.get("scaling_factor")
    for key in _PREDICT_ONLY:
        mc.pop(key, None)
    if not yarn and "extend_method" in (data.get("model") or {}).get("model_config", {}):
        mc["extend_method"] = data["model"]["model_config"]["extend_method"]  # None: plain RoPE, as for training
    sections = {"model": {"model_config": mc}, **({"moe_config": data["moe_config"]} if "moe_config" in data else {})}
    model = translate(sections, source)[0].get("model", {})  # only the model sections: no run notes to show
    if yarn and scaling is not None:
        if not isinstance(scaling, dict):
            raise UserError(f"{source}: model.model_config.scaling_factor is a {type(scaling).__name__}, expected the YaRN "
                            f"mapping (factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim)")
        model["rope_scaling"] = {"type": "yarn", **scaling}
    return model
