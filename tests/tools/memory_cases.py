"""Configs of the dry-run-vs-measurement test (`test_dryrun_measured.py`): a model big enough that
weights and activations, not the runtime, are most of a rank's memory, small enough for 2 CPU cores."""

from __future__ import annotations

from dataclasses import dataclass

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


def case_cfg(prefix: str, out: str, parallel: dict, recompute: str = "none", batch_size: int = 4, seq: int = 256,
             model: dict | None = None, train: dict | None = None, optimizer: dict | None = None):
    d = {"model": {**MODEL, **(model or {})}, "data": {"data_path": [prefix], "split": "100,0,0", "seq_length": seq},
         "train": {"steps": 2, "batch_size": batch_size, "seed": 0, "device": "cpu", "threads": 1, "recompute": recompute,
                   **(train or {})},
         "optimizer": optimizer or {},
         "lr_schedule": {"type": "cosine", "learning_rate": 1e-3, "warmup_steps": 1, "min_lr": 1e-4},
         "checkpoint": {"output_dir": out, "save_at_end": False, "export_hf": False},
         "eval": {"eval_steps": 0, "eval_at_end": False},
         "logging": {"progress_bar": False, "plots": False}, "parallel": parallel}
    cfg = run_config_from_dict(d)
    cfg.validate()
    return cfg


V129K = {"model": {"vocab_size": 129280}, "batch_size": 1, "seq": 128}
"""DeepSeek-V3's vocabulary: the head, its logits (128 tokens x 129k: 63 MiB each) and the embedding dominate."""
PP2 = {"pipeline_stage": 2, "micro_batch_num": 2}
BF16 = {"train": {"precision": "bf16"}, "optimizer": {"state_dtype": "bfloat16"}}  # the 1B / 671B YAMLs' precision


@dataclass(frozen=True)
class Case:
    processes: int
    parallel: dict
    recompute: str
    keywords: dict
    """more `case_cfg` arguments"""
    measured: dict[int, int]
    """rank -> peak tensor bytes of `dsv3 train --report-memory` (MEASURED_WITH), recorded"""
    seconds: int
    """wall time of that run on a loaded 2-core machine"""


MEASURED_WITH = ("python -m torch.distributed.run --nproc-per-node=N -m dsv3 train --config CASE.yaml --report-memory DIR "
                 "(OMP_NUM_THREADS=1, torch 2.13 CPU, gloo; `python -m dsv3 train` for one process): the peak_tensor_bytes "
                 "of DIR/memory-rank*.json")

CASES = {  # name -> Case; MoE + MTP in every case; pp cases run 1F1B over 2 micro-batches
    "1proc": Case(1, {}, "none", {}, {0: 309209036}, 13),
    "dp2": Case(2, {"data_parallel": 2}, "none", {}, {0: 308819352, 1: 308819352}, 38),
    "pp2": Case(2, PP2, "none", {}, {0: 164377392, 1: 362591860}, 35),
    "dp2pp2ep2": Case(4, {"data_parallel": 2, **PP2, "expert_parallel": 2}, "none", {}, {0: 151799776, 1: 151906480, 2: 326776500, 3: 324502884}, 32),
    "dp2pp2ep2_rc": Case(4, {"data_parallel": 2, **PP2, "expert_parallel": 2}, "full", {}, {0: 82256744, 1: 81369704, 2: 237497868, 3: 237497868}, 46),
    "tp2": Case(2, {"model_parallel": 2}, "none", {}, {0: 295114776, 1: 295114776}, 19),
    "tp2_sp": Case(2, {"model_parallel": 2, "use_seq_parallel": True}, "none", {}, {0: 280406040, 1: 280406040}, 16),
    "tp2_sp_v129k_rc": Case(4, {"model_parallel": 2, "use_seq_parallel": True, **PP2}, "full", V129K,
                              {0: 632747336, 1: 632747336, 2: 1219431052, 3: 1219431052}, 25),
    "dp2tp2pp2ep2_v129k_bf16": Case(8, {"data_parallel": 2, "model_parallel": 2, **PP2, "expert_parallel": 2}, "none",
                                    {**V129K, **BF16}, {0: 419618680, 1: 419618680, 2: 419618680, 3: 419618680,
                                                        4: 938012040, 5: 938176520, 6: 938108672, 7: 938079888}, 54),
    "tp2_v129k": Case(2, {"model_parallel": 2}, "none", V129K, {0: 990915920, 1: 990915920}, 49),
    "tp2pp2_v129k_rc": Case(4, {"model_parallel": 2, **PP2}, "full", V129K, {0: 633009480, 1: 633009480, 2: 1220677260, 3: 1220677260}, 63),
    "dp2pp2ep2_v129k": Case(4, {"data_parallel": 2, **PP2, "expert_parallel": 2}, "none", V129K, {0: 691407432, 1: 691407432, 2: 1653731300, 3: 1653772340}, 51),
    "dp2pp2ep2_v129k_reduce_every": Case(4, {"data_parallel": 2, **PP2, "expert_parallel": 2, "reduce_grads_every_microbatch": True},
                                         "none", V129K, {0: 887283528, 1: 887283528, 2: 1715797860, 3: 1715838900}, 60),
    "dp2tp2pp2ep2_v129k": Case(8, {"data_parallel": 2, "model_parallel": 2, **PP2, "expert_parallel": 2}, "none", V129K, {0: 452577912, 1: 452577912, 2: 452577912, 3: 452577912, 4: 1108242508, 5: 1108488748, 6: 1108448052, 7: 1108324588}, 56),
    "dp2tp2pp2ep2_v129k_rc": Case(8, {"data_parallel": 2, "model_parallel": 2, **PP2, "expert_parallel": 2}, "full", V129K, {0: 452577912, 1: 452577912, 2: 452577912, 3: 452577912, 4: 1103810620, 5: 1103810620, 6: 1103810620, 7: 1103810620}, 83),
}
