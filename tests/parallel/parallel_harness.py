"""Helpers of the parallel tests, which run the shipped trainer: `dsv3 launch "train --config ..."`,
or `multi_run.py` under torchrun, which runs `Trainer(load_run_config(yaml)).fit()` (what `dsv3
train` does) for several configs in one process group (process start-up dominates on 2 cores).
One-process references are the same trainer in this process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3.config.schema import ModelConfig, RopeScaling

HERE = Path(__file__).resolve().parent


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
                first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                n_group=4, topk_group=2, num_nextn_predict_layers=1, max_position_embeddings=128, torch_dtype="float32",
                rope_scaling=RopeScaling(type="yarn", factor=2.0, original_max_position_embeddings=64))
    base.update(kw)
    return ModelConfig(**base)


def make_model(cfg: ModelConfig, seed: int = 0):
    """The single-process model: meta build + the layout-independent init (as `dsv3 train` in one process)."""
    from dsv3.model.transformer import Transformer
    from dsv3.parallel.init import materialize

    with torch.device("meta"):
        model = Transformer(cfg)
    return materialize(model, torch.device("cpu"), cfg, seed)


def write_dataset(path: Path) -> str:
    """A synthetic, learnable token dataset (arithmetic progressions), 300 documents of 65 tokens."""
    import numpy as np

    from dsv3.data.indexed_dataset import IndexedDatasetBuilder

    p = str(path / "syn_text_document")
    b = IndexedDatasetBuilder(p + ".bin")
    rng = np.random.default_rng(0)
    for _ in range(300):
        b.add_document((rng.integers(0, 256) + rng.integers(1, 4) * np.arange(65)) % 256, [65])
    b.finalize(p + ".idx")
    return p


def run_cfg(prefix: str, out: Path, parallel: dict, steps: int = 4, batch_size: int = 2, recompute: str = "none",
            save: bool = True, eval_steps: int = 2, state_dtype: str = "float32", **model):
    """A run of `steps` steps of the tiny model on `prefix`, evaluating at step 0 and every `eval_steps`."""
    from dsv3.config.load import to_dict
    from dsv3.config.train import run_config_from_dict

    d = {"model": to_dict(tiny_cfg(**model)),
         "data": {"data_path": [prefix], "valid_data_path": [prefix], "split": "100,0,0", "seq_length": 32},
         "train": {"steps": steps, "batch_size": batch_size, "seed": 0, "device": "cpu", "threads": 1, "recompute": recompute},
         "optimizer": {"state_dtype": state_dtype},
         "lr_schedule": {"type": "cosine", "learning_rate": 3e-3, "warmup_steps": 1, "min_lr": 3e-4},
         "checkpoint": {"output_dir": str(out), "save_steps": 2 if save else 0, "save_at_end": save, "export_hf": save,
                        "keep_last": 3},
         "eval": {"eval_steps": eval_steps, "eval_iters": 3, "eval_at_end": False},  # 3: a short last group under PP
         "logging": {"progress_bar": False, "plots": False}, "parallel": parallel}
    cfg = run_config_from_dict(d)
    cfg.validate()
    return cfg


def losses(out: Path) -> list[float]:
    return [json.loads(s)["loss"] for s in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in s]


def valid_losses(out: Path) -> dict[int, float]:
    recs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "eval"' in s]
    return {r["step"]: r["valid_loss"] for r in recs}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], what: str, log: Path | None = None, timeout: int = 420) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)
        pytest.fail(f"{what} timed out")
    tail = log.read_text()[-4000:] if log is not None and log.is_file() else out[-4000:]
    assert proc.returncode == 0, (err[-4000:], tail)


def launch(tmp: Path, cfg_path: Path, n: int, *extra: str) -> None:
    """`dsv3 launch "train --config cfg_path ..." n n 127.0.0.1 PORT 0 LOG True 300`, waiting for it."""
    log_dir = tmp / f"log-{cfg_path.stem}"
    _run([sys.executable, "-m", "dsv3", "launch", f"train --config {cfg_path} {' '.join(extra)}",
          str(n), str(n), "127.0.0.1", str(free_port()), "0", str(log_dir), "True", "300"], "dsv3 launch", log_dir / "worker_0.log")


def multi_run(n: int, configs: list[Path], out: Path) -> None:
    """torchrun of multi_run.py: each config trained in turn by the same `n` processes."""
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(free_port()),
          str(HERE / "multi_run.py"), str(out), *map(str, configs)], "torchrun multi_run.py")
