"""The MindSpore Transformers key tables and the walker that enforces them (`dsv3.config.mindspore`).

Every key of a MindSpore run YAML is mapped to one of our fields, handled by a rule, or listed in
`_IGNORED` (keys that only mean something to MindSpore/Ascend, with `_WHY` for some of them);
`_Translator.walk` dispatches each key and makes any other key an error naming it.
"""

from __future__ import annotations

from typing import Any, Callable

from dsv3.errors import UserError

# MindSpore model_config key -> ModelConfig field (value copied as is).
_MODEL_MAP = {
    "hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
    "max_position_embeddings": "max_position_embeddings", "intermediate_size": "intermediate_size",
    "kv_lora_rank": "kv_lora_rank", "q_lora_rank": "q_lora_rank", "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim", "qk_nope_head_dim": "qk_nope_head_dim", "vocab_size": "vocab_size",
    "rms_norm_eps": "rms_norm_eps", "theta": "rope_theta", "mtp_depth": "num_nextn_predict_layers",
}
_MOE_MAP = {
    "expert_num": "n_routed_experts", "num_experts_chosen": "num_experts_per_tok", "shared_expert_num": "n_shared_experts",
    "routed_scaling_factor": "routed_scaling_factor", "norm_topk_prob": "norm_topk_prob",
    "first_k_dense_replace": "first_k_dense_replace", "moe_intermediate_size": "moe_intermediate_size",
    "topk_group": "topk_group", "n_group": "n_group",
}
_PARALLEL_MAP = {k: k for k in ("data_parallel", "model_parallel", "pipeline_stage", "expert_parallel", "micro_batch_num", "use_seq_parallel")}

# Keys with no meaning for a PyTorch run, and why (shown once when a file uses them).
_IGNORED = {
    "": {"load_ckpt_format", "src_strategy_path_or_dir", "auto_trans_ckpt", "only_save_strategy", "use_parallel",
         "micro_batch_interleave_num", "profile", "profile_start_step", "profile_stop_step", "init_start_profile",
         "profile_communication", "profile_memory", "context", "train_dataset_task",
         "trainer"},
    "runner_config": {"sink_mode", "sink_size"},
    "runner_wrapper": {"type", "scale_sense"},
    "optimizer": {"learning_rate"},
    "model.model_config": {
        "type", "auto_register", "batch_size", "n_kv_heads", "multiple_of", "bos_token_id", "eos_token_id",
        "pad_token_id", "ignore_token_id", "layernorm_compute_type", "softmax_compute_type", "rotary_dtype",
        "router_dense_type", "param_init_type", "use_past", "use_flash_attention", "use_fused_swiglu",
        "use_fused_rope", "input_sliced_sig", "checkpoint_name_or_path", "return_extra_loss", "qkv_concat"},
    "moe_config": {"expert_group_size", "capacity_factor", "aux_loss_factor", "routing_policy", "enable_sdrop",
                   "use_fused_ops_topkrouter", "group_wise_a2a", "expert_model_parallel", "callback_moe_droprate",
                   "use_gmm", "use_fused_ops_permute", "enable_gmm_safe_tokens"},
    "parallel_config": {"vocab_emb_dp", "gradient_aggregation_group"},
    "recompute_config": {"parallel_optimizer_comm_recompute", "mp_comm_recompute", "recompute_slice_activation"},
    "train_dataset": {"input_columns", "construct_args_key", "num_parallel_workers", "python_multiprocessing",
                      "drop_remainder", "repeat", "numa_enable", "prefetch_size"},
    "train_dataset.data_loader": {"datasets_type", "shuffle"},
    "train_dataset.data_loader.config": {"num_dataset_builder_threads", "create_attention_mask"},
}
# Why some ignored keys are safe to ignore (the rest are Ascend graph/fusion/strategy options).
_WHY = {
    "capacity_factor": "DeepSeek-V3 never drops tokens",
    "bos_token_id": "ids come from the tokenizer: bos 0, eos 1",
    "n_kv_heads": "MLA has no separate KV heads",
    "aux_loss_factor": "superseded by aux_loss_factors",
    "auto_trans_ckpt": "train.init_from always reads each rank's own slices, whatever the layout",
    "context": "Ascend graph-mode settings; dsv3 dryrun and balance read its max_device_memory",
}


class _Translator:
    def __init__(self, source: str):
        self.source = source
        self.out: dict[str, dict[str, Any]] = {k: {} for k in ("model", "data", "train", "optimizer", "lr_schedule",
                                                                "checkpoint", "eval", "logging", "parallel")}
        self.ignored: list[str] = []
        self.extra: dict[str, Any] = {}
        """Values kept (with their paths) for the rules that combine several keys."""
        self.notes: list[str] = []
        """What the user should read about the translation (printed by the caller)."""

    def err(self, where: str, msg: str) -> UserError:
        return UserError(f"{self.source}: {where}: {msg}")

    def walk(self, section: dict, where: str, handlers: dict[str, Callable[[Any, str], None]]) -> None:
        """Dispatch every key of `section` to its handler; ignored keys are recorded; others are errors."""
        if not isinstance(section, dict):
            raise self.err(where or "top level", f"expected a mapping, got {section!r}")
        ignored = _IGNORED.get(where, set())
        for key, value in section.items():
            path = f"{where}.{key}" if where else key
            if key in handlers:
                handlers[key](value, path)
            elif key in ignored:
                self.ignored.append(path + (f" ({_WHY[key]})" if key in _WHY else ""))
            else:
                valid = sorted(set(handlers) | ignored)
                raise self.err(path, f"unknown key in a MindSpore config; valid keys here: {', '.join(valid)}")

    def put(self, section: str, field: str) -> Callable[[Any, str], None]:
        def h(value: Any, path: str) -> None:
            self.out[section][field] = value
        return h

    def expect(self, allowed: tuple, then: Callable[[Any, str], None] | None = None) -> Callable[[Any, str], None]:
        def h(value: Any, path: str) -> None:
            if value not in allowed:
                raise self.err(path, f"{value!r} is not supported (expected one of {list(allowed)})")
            if then:
                then(value, path)
        return h


def _group(paths: list[str]) -> str:
    """'a.b.c', 'a.b.d', 'e' -> 'a.b: c, d; e' (one readable line)."""
    groups: dict[str, list[str]] = {}
    for p in paths:
        head, _, tail = p.partition(" ")
        sec, _, key = head.rpartition(".")
        groups.setdefault(sec, []).append(key + (" " + tail if tail else ""))
    return "; ".join((f"{sec}: " if sec else "") + ", ".join(keys) for sec, keys in groups.items())
