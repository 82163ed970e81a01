"""One rank's model, torchtitan's order: build on the meta device -> parallelize (PP stages, EP,
TP, recompute, FSDP) -> materialise only this rank's shards (`to_empty`) -> initialise them in place.

No rank ever allocates a full copy of the model: the meta model holds no storage, the pipeline
stages are made of its modules (not copies), and `dsv3.parallel.init` fills each shard from a
per-parameter, per-block generator, so the weights equal a single-process init with the same seed.
With a `fill` callable (the trainer's `train.init_from`) the shards are filled from a checkpoint
instead, each rank reading only its own slices (`dsv3.checkpoint.slices`). The trainer (its
distributed strategy) and the dry-run's fake-process-group ranks (`dsv3.tools.memory.rank_states`)
build through `build_parallel_model`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dsv3.config.schema import ModelConfig
from dsv3.kernels import apply_fast_paths
from dsv3.model.transformer import Transformer
from dsv3.parallel.api import DistributedModel, parallelize
from dsv3.parallel.dims import Meshes, ParallelDims
from dsv3.parallel.init import canonical_name, init_buffers, materialize


def build_parallel_model(model_cfg: ModelConfig, dims: ParallelDims, meshes: Meshes, seed: int, *,
                         param_dtype: torch.dtype | None = None, device: torch.device | None = None,
                         fill: Callable[[list[nn.Module]], object] | None = None,
                         prepare: Callable[[nn.Module], object] | None = None) -> DistributedModel:
    """This rank's parts of the model; `device` None leaves them on the meta device (layout checks).

    `fill(parts)` replaces the seeded init: it gets the materialised parts (buffers initialised) and
    copies its weights into them, each rank its own slices (the trainer passes
    `dsv3.train.init_from.InitSource.fill` for `train.init_from`). `prepare(model)` runs on the
    meta-device model before any parallelism (e.g. swapping modules for FP8 training); the speed paths (`dsv3.kernels.apply_fast_paths`) are swapped in after it. The
    stage cut and recompute come from `dims` (`RunConfig.layout()`)."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    if prepare is not None:
        prepare(model)
    apply_fast_paths(model)
    dm = parallelize(model, dims, meshes, param_dtype=param_dtype)
    if device is not None and fill is None:
        for part in dm.parts:
            materialize(part, device, model_cfg, seed)
    elif device is not None:
        for part in dm.parts:
            part.to_empty(device=device)
            init_buffers(part, model_cfg)
        fill(dm.parts)
    return dm


def held_parameters(dm: DistributedModel) -> dict:
    """What this rank holds: `local_params` / `local_bytes` (its shards, as allocated),
    `stage_params` (the global size of the parameters of its stages, the last stage's copy of the
    embedding not counted again) and `names` (canonical names of those parameters)."""
    local = local_bytes = stage = 0
    names: list[str] = []
    seen: set[int] = set()
    for part in dm.parts:
        copy = getattr(part, "is_last", False) and not getattr(part, "is_first", True)
        for name, p in part.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            t = p.to_local() if isinstance(p, DTensor) else p
            local += t.numel()
            local_bytes += t.numel() * t.element_size()
            name = canonical_name(name)
            if copy and name == "model.embed_tokens.weight":
                continue
            stage += p.numel()
            names.append(name)
    return {"local_params": local, "local_bytes": local_bytes, "stage_params": stage, "names": names}
