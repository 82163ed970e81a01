"""Sharded loading for tensor/expert-parallel inference: each rank reads only its slices.

`load_sharded(model_dir, ctx)` checks the whole checkpoint against config.json from the file headers
(the single-process loader's dry run: same names, shapes and one-line errors), builds the model on
the meta device, cuts it to this rank's shapes (`dsv3.infer.parallel.shard_model`), then streams
each tensor's slice with safetensors' `get_slice`: a rank never reads, let alone holds, a full
sharded tensor, and it skips the routed experts other ranks own. FP8 weights are dequantised per
slice: the rows/columns read are widened to whole 128x128 scale blocks, dequantised, and cropped
(identical values to dequantising the full matrix and slicing it). Names go through
`dsv3.checkpoint.hf_map` like every other loader.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dsv3.checkpoint import hf_map
from dsv3.checkpoint.fp8 import BLOCK, is_fp8, weight_dequant
from dsv3.checkpoint.io import (_DTYPES, KEEP_FP32, CheckpointReader, _assign, load_checkpoint_into, parse_dtype,
                                resolve_config)
from dsv3.errors import UserError
from dsv3.infer.parallel import ParallelContext, shard_model


def read_slice(reader: CheckpointReader, name: str, index: tuple[slice, ...]) -> torch.Tensor:
    """reader's tensor `name` restricted to `index` (one slice per dim), dequantised to fp32 if it is
    stored FP8 (block scales) or int8 (per-row scales); only the needed part of the file is read."""
    fname, shape, dtype = reader.meta[name]
    sl = reader._handles[fname].get_slice(name)
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    if not (dtype.startswith("F8") or dtype == "I8"):
        return sl[index]
    sname = name + hf_map.SCALE_SUFFIX
    if sname not in reader.meta:
        raise UserError(f"{reader.path}: quantised tensor {name} ({dtype}) has no {sname}")
    scale = reader._handles[reader.meta[sname][0]].get_slice(sname)
    rows, cols = (s.indices(n) for s, n in zip(index, shape))
    if dtype == "I8":  # per-row scales [M, 1]
        return sl[index].float() * scale[rows[0] : rows[1]].float()
    # FP8: widen to whole blocks, dequantise, crop
    r0, c0 = rows[0] // BLOCK * BLOCK, cols[0] // BLOCK * BLOCK
    r1, c1 = min(-(-rows[1] // BLOCK) * BLOCK, shape[0]), min(-(-cols[1] // BLOCK) * BLOCK, shape[1])
    w = sl[r0:r1, c0:c1]
    assert is_fp8(w)
    s = scale[r0 // BLOCK : -(-r1 // BLOCK), c0 // BLOCK : -(-c1 // BLOCK)]
    return weight_dequant(w, s, dtype=torch.float32)[rows[0] - r0 : rows[1] - r0, cols[0] - c0 : cols[1] - c0]


def _stream_slices(model, reader: CheckpointReader, ctx: ParallelContext, dtype: torch.dtype, device, skip: tuple[str, ...]) -> None:
    """Fill the meta-device, already-cut `model` with this rank's slices (names/shapes were checked)."""
    cfg = model.config
    expected = model.state_dict(keep_vars=True)
    building: dict[str, torch.Tensor] = {}
    left: dict[str, int] = {}

    def target_dtype(name: str) -> torch.dtype:
        return torch.float32 if name.endswith(KEEP_FP32) else dtype

    for hf_name in reader.names():
        shape = reader.shape(hf_name)
        if skip and hf_name.startswith(skip):
            continue
        tgt = hf_map.from_hf(hf_name, cfg)
        if tgt is None or tgt.kind in ("scale", "tied") or tgt.name not in expected:
            continue  # scales are read with their weight; the dry run reported anything unexpected
        if tgt.kind == "tensor":
            t = read_slice(reader, hf_name, ctx.local_index(tgt.name, shape))
            _assign(model, tgt.name, t.to(device=device, dtype=target_dtype(tgt.name)).contiguous())
            continue
        if tgt.kind == "gate_up":  # transformers v5 fused [E, 2I, D]: gate rows, then up rows
            raise UserError(f"{reader.path}: {hf_name} is transformers' in-memory fused expert layout; sharded loading "
                            "reads the hub layout (one tensor per expert): re-save it with `dsv3 convert`")
        full = (cfg.n_routed_experts, *shape)  # one expert of a stacked tensor
        idx = ctx.local_index(tgt.name, full)
        lo, hi, _ = idx[0].indices(full[0])
        if not lo <= tgt.expert < hi:
            continue  # another rank's expert: never read
        if tgt.name not in building:
            want = expected[tgt.name]
            building[tgt.name] = torch.empty(tuple(want.shape), dtype=target_dtype(tgt.name), device=device)
            left[tgt.name] = hi - lo
        building[tgt.name][tgt.expert - lo].copy_(read_slice(reader, hf_name, idx[1:]))
        left[tgt.name] -= 1
        if left[tgt.name] == 0:
            _assign(model, tgt.name, building.pop(tgt.name))
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta" and not n.endswith("tokens_per_expert")]
    if missing:
        raise UserError(f"{reader.path}: this rank's slices of {missing[:4]} were not found")


def load_sharded(model_dir: str | Path, ctx: ParallelContext, dtype: str | torch.dtype | None = None,
                 device: str | torch.device = "cpu", mtp: bool | None = None, **runtime):
    """This rank's shard of an HF-format DeepSeek-V3 directory (a `Transformer` in eval mode, weights
    cut per `ctx`; give it to `LLMEngine(..., parallel=ctx)`). dtype / mtp / runtime as
    `dsv3.checkpoint.io.from_pretrained`; FP8 and int8 checkpoints are dequantised (per slice)."""
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
        shard_model(model, ctx)
        n = cfg.num_hidden_layers
        skip = tuple(f"model.layers.{n + k}." for k in range(skip_n)) + tuple(f"model.mtp.{k}." for k in range(skip_n))
        _stream_slices(model, reader, ctx, torch_dtype, device, skip)
    finally:
        reader.close()
    model.init_non_persistent_buffers(device)
    model.config = dataclasses.replace(cfg, torch_dtype=str(torch_dtype).replace("torch.", ""))
    model.parallel = ctx
    return model.eval()
