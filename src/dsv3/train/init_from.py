"""`train.init_from` (MindSpore `load_checkpoint`): start a run from existing weights.

One function, `load_init_weights`: the model is built on the meta device and every tensor streamed
straight into place by the HF loader (`dsv3.checkpoint.io.load_checkpoint_into`: FP8 dequantised,
expert tensors stacked, names/shapes checked), as fp32 master weights. Accepted directories:
* an HF safetensors directory (config.json + model*.safetensors, BF16 or FP8);
* a `dsv3 train` checkpoint `step-N` (model.safetensors + config.resolved.yaml) or a run directory
  (its latest checkpoint). Only the weights are taken: the optimizer is fresh and the run starts at step 0.

The checkpoint's architecture must equal the run's `model` section (runtime switches and training
factors aside); otherwise one line names every differing field. MTP: the run may train with the
checkpoint's MTP depth or without MTP (its MTP layers are then skipped).

The distributed trainer calls this before sharding (each rank loads the whole model, then
parallelises it); a per-rank loader would pass its slice plan to `load_checkpoint_into` instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from dsv3.config.schema import ModelConfig
from dsv3.errors import UserError

NOT_ARCHITECTURE = {"attn_impl", "moe_impl", "mtp_hidden", "torch_dtype", "initializer_range", "aux_loss_alpha",
                    "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "num_nextn_predict_layers"}
"""ModelConfig fields that may differ between the checkpoint and the run (no effect on the weights' maths)."""


def resolve_init_dir(path: str | Path) -> Path:
    """The directory to read: `path` itself, or for a `dsv3 train` run directory its latest checkpoint."""
    from dsv3.train.checkpoint import checkpoint_root, latest_checkpoint

    p = Path(path)
    if p.is_file():
        raise UserError(f"train.init_from {p}: expected a directory (HF safetensors, or a dsv3 checkpoint step-N); "
                        f"MindSpore .ckpt files are not supported: convert them to HF safetensors first")
    if not p.is_dir():
        raise UserError(f"train.init_from {p}: directory not found")
    if not any(p.glob("*.safetensors")) and (latest := latest_checkpoint(checkpoint_root(p))) is not None:
        return latest
    return p


def architecture_diff(ckpt: ModelConfig, run: ModelConfig) -> list[str]:
    """'field: checkpoint X, config Y' for every architecture field that differs."""
    out = []
    for f in dataclasses.fields(ModelConfig):
        if f.name in NOT_ARCHITECTURE:
            continue
        a, b = getattr(ckpt, f.name), getattr(run, f.name)
        if a != b:
            out.append(f"{f.name}: checkpoint {a!r}, config {b!r}")
    return out


def load_init_weights(cfg: ModelConfig, path: str | Path, device: torch.device | str,
                      log: Callable[[str], None] | None = None) -> torch.nn.Module:
    """A `Transformer(cfg)` in train mode with fp32 weights read from `path` (see the module docstring)."""
    from dsv3.checkpoint.io import CheckpointReader, count_mtp_layers, load_checkpoint_into, load_dir_config
    from dsv3.model.transformer import Transformer

    d = resolve_init_dir(path)
    reader = CheckpointReader(d)
    try:
        ckpt_cfg = load_dir_config(d)[0]
        diff = architecture_diff(ckpt_cfg, cfg)
        if diff:
            raise UserError(f"train.init_from {d}: the checkpoint's architecture differs from the run's model config: "
                            + "; ".join(diff))
        have, want = count_mtp_layers(reader, ckpt_cfg), cfg.num_nextn_predict_layers
        if want not in (0, have):
            raise UserError(f"train.init_from {d}: model.num_nextn_predict_layers is {want} but the checkpoint holds "
                            f"{have} MTP layer(s); set it to {have} (train them) or 0 (no MTP)")
        with torch.device("meta"):
            model = Transformer(cfg)
        load_checkpoint_into(model, reader, torch.float32, device, skip_mtp_layers=have - want)
    finally:
        reader.close()
    model.init_non_persistent_buffers(device)
    if log is not None:
        n = sum(p.numel() for p in model.parameters())
        log(f"init_from {d}: {n:,} parameters loaded (fp32 master weights){'; its MTP layers skipped' if have > want else ''}; "
            f"fresh optimizer, step 0")
    return model.train()
