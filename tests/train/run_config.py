"""A small run config for trainer tests (a 2-layer DeepSeek-V3 with every feature, real vocab)."""

from __future__ import annotations

from dsv3.config.train import RunConfig, run_config_from_dict

SAMPLE_LEN = 64  # the data is stitched into 65-token sequences: data.seq_length may be at most 64

MODEL = dict(
    vocab_size=129280, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, rope_scaling=None, max_position_embeddings=512, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, num_nextn_predict_layers=1,
    aux_loss_alpha=1e-4, torch_dtype="float32",
)


def small_run(prefix: str, out_dir, **sections) -> RunConfig:
    """RunConfig over `prefix`; keyword sections (dicts) update the defaults."""
    d = {
        "model": dict(MODEL),
        "data": {"data_path": [prefix], "split": "90,10,0", "seq_length": 32},
        "train": {"steps": 6, "batch_size": 1, "seed": 0, "device": "cpu", "threads": 2},
        "lr_schedule": {"type": "cosine", "learning_rate": 3e-3, "warmup_steps": 2, "min_lr": 3e-4},
        "checkpoint": {"output_dir": str(out_dir), "save_steps": 3, "export_hf": False},
        "eval": {"eval_steps": 0, "eval_iters": 2, "eval_at_end": False},
        "logging": {"progress_bar": False, "plots": False},
        "parallel": {"micro_batch_num": 2},
    }
    for k, v in sections.items():
        d[k].update(v)
    cfg = run_config_from_dict(d)
    cfg.validate()
    return cfg


def train_losses(run_dir) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl."""
    from dsv3.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r.get("kind") == "train"}


def steps_then_resume(cfg: RunConfig, n: int):
    """Run n steps, checkpoint, drop the trainer, and build a fresh one with resume=True.

    Returns (losses of the first n steps, the resumed Trainer, not yet fitted)."""
    import dataclasses

    from dsv3.train.trainer import Trainer

    first = Trainer(cfg, quiet=True)
    losses = {}
    for _ in range(n):
        rec = first.train_step()
        losses[rec["step"]] = rec["loss"]
    first.save()
    del first
    resumed = Trainer(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=True)), quiet=True)
    return losses, resumed
