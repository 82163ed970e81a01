"""Configs of the dry-run-vs-measurement test (`test_dryrun_measured.py`): a model big enough that
weights and activations, not the runtime, are most of a rank's memory, small enough for 2 CPU cores."""

from __future__ import annotations

import numpy as np

from dsv3.config.train import run_config_from_dict

MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=256, num_hidden_layers=4,
             first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
             qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
             n_group=4, topk_group=2, num_nextn_predict_layers=1, max_position_embeddings=512, torch_dtype="float32")
# qk 32+32 = v 64: CPU attention takes its fused (flash) kernel, as a GPU would


def write_data(prefix: str, vocab: int = 4096, docs: int = 64, length: int = 257) -> str:
    from dsv3.data.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin")
    rng = np.random.default_rng(0)
    for _ in range(docs):
        b.add_document(rng.integers(0, vocab, length), [length])
    b.finalize(prefix + ".idx")
    return prefix


def case_cfg(prefix: str, out: str, parallel: dict, recompute: str = "none", batch_size: int = 4, seq: int = 256):
    d = {"model": MODEL, "data": {"data_path": [prefix], "split": "100,0,0", "seq_length": seq},
         "train": {"steps": 2, "batch_size": batch_size, "seed": 0, "device": "cpu", "threads": 1, "recompute": recompute},
         "lr_schedule": {"type": "cosine", "learning_rate": 1e-3, "warmup_steps": 1, "min_lr": 1e-4},
         "checkpoint": {"output_dir": out, "save_at_end": False, "export_hf": False},
         "eval": {"eval_steps": 0, "eval_at_end": False},
         "logging": {"progress_bar": False, "plots": False}, "parallel": parallel}
    cfg = run_config_from_dict(d)
    cfg.validate()
    return cfg


CASES = {  # name -> (processes, parallel, recompute)
    "1proc": (1, {}, "none"),
    "dp2": (2, {"data_parallel": 2}, "none"),
    "pp2": (2, {"pipeline_stage": 2, "micro_batch_num": 2}, "none"),
    "dp2pp2ep2": (4, {"data_parallel": 2, "pipeline_stage": 2, "expert_parallel": 2, "micro_batch_num": 2}, "none"),
    "dp2pp2ep2_rc": (4, {"data_parallel": 2, "pipeline_stage": 2, "expert_parallel": 2, "micro_batch_num": 2}, "full"),
}
