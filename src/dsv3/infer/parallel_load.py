"""Sharded loading for tensor/expert-parallel inference: each rank reads only its slices.

`load_sharded(model_dir, ctx)` checks the whole checkpoint against config.json from the file headers
(the single-process loader's dry run: same names, shapes and one-line errors), builds the model on
the meta device, cuts it to this rank's shapes (`dsv3.infer.parallel.shard_model`), then reads each
tensor's box (`ParallelContext.local_index`) through the training side's per-rank slice reader
(`dsv3.checkpoint.slices.SliceReader`: safetensors `get_slice`, per-expert files of the experts this
rank owns only, FP8 dequantised per box from the scale blocks it touches). A rank never reads, let
alone holds, a full sharded tensor. Names go through `dsv3.checkpoint.hf_map` like every other loader.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dsv3.checkpoint.load import _DTYPES, KEEP_FP32, load_checkpoint_into, parse_dtype, resolve_config
from dsv3.checkpoint.reader import CheckpointReader
from dsv3.checkpoint.slices import SliceReader
from dsv3.infer.parallel import ParallelContext, pad_local, shard_model


@torch.no_grad()
def _fill(model, reader: SliceReader, ctx: ParallelContext, full_shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
          device) -> int:
    """Materialise every tensor of the meta-device, already-cut `model` from this rank's box of the
    checkpoint tensor (names/shapes were checked by the dry run). -> bytes read from the files."""
    for name, t in model.state_dict(keep_vars=True).items():
        box = ctx.local_index(name, full_shapes[name])
        src = name if name in reader else "model.embed_tokens.weight"  # a tied head reads the embedding
        local = reader.read(src, box).to(device=device, dtype=torch.float32 if name.endswith(KEEP_FP32) else dtype)
        local = pad_local(local, tuple(t.shape))  # a vocabulary tp does not divide: zero rows
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if attr in mod._parameters:
            mod._parameters[attr] = torch.nn.Parameter(local.contiguous(), requires_grad=False)
        else:
            mod._buffers[attr] = local.contiguous()
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return reader.bytes_read


def load_sharded(model_dir: str | Path, ctx: ParallelContext, dtype: str | torch.dtype | None = None,
                 device: str | torch.device = "cpu", mtp: bool | None = None, **runtime):
    """This rank's shard of an HF-format DeepSeek-V3 directory (a `Transformer` in eval mode, weights
    cut per `ctx`; give it to `LLMEngine(..., parallel=ctx)`). dtype / mtp / runtime as
    `dsv3.model.Transformer.from_pretrained`; FP8 and int8 checkpoints are dequantised (per slice)."""
    from dsv3.model.transformer import Transformer

    path = Path(model_dir)
    reader = CheckpointReader(path)
    try:
        cfg, skip_n = resolve_config(path, reader, mtp, **runtime)
        ctx.validate(cfg)
        torch_dtype = parse_dtype(dtype, default=cfg.torch_dtype if cfg.torch_dtype in _DTYPES else "bfloat16")
        with torch.device("meta"):
            model = Transformer(cfg)
        load_checkpoint_into(model, reader, torch_dtype, "meta", skip_mtp_layers=skip_n, dry_run=True)
        full_shapes = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
        shard_model(model, ctx)
        model.bytes_read = _fill(model, SliceReader(reader, cfg, skip_mtp_layers=skip_n), ctx, full_shapes, torch_dtype, device)
    finally:
        reader.close()
    model.init_non_persistent_buffers(device)
    model.config = dataclasses.replace(cfg, torch_dtype=str(torch_dtype).replace("torch.", ""))
    model.parallel = ctx
    return model.eval()  # model.bytes_read: bytes this rank read from the files
