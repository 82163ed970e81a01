"""One rank of a parallel layout, built without devices: torch's fake process group (every
collective a no-op, `torch.testing._internal.distributed.fake_pg`) stands in for the other ranks,
and the rank's part is built on the meta device through the training build path
(`build.build_parallel_model`: PP stages, EP, TP, recompute, FSDP) without materialising it.

This is how a layout bigger than the machine (the seed's 1024-device 671B run) is checked on one
CPU: which stages, layers and shards a rank gets and how many parameters/bytes it holds. The fake
group is process-global, so one process checks one rank (run ranks in separate processes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsv3.config.train import RunConfig
from dsv3.parallel.build import build_parallel_model, held_parameters
from dsv3.parallel.dims import ParallelDims, build_meshes


def layout_rank(cfg: RunConfig, rank: int) -> dict:
    """Build `rank`'s part of `cfg`'s layout on the meta device under a fake process group of the
    layout's world size; returns its coordinates, stages, decoder layers and parameter counts
    (`held_parameters`: `local_params`/`local_bytes` as they would be allocated in fp32,
    `stage_params` the global size of its stages' parameters)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    dims = ParallelDims.from_config(cfg.parallel)
    dims.validate(None, cfg.model, seq_len=cfg.data.seq_length)
    world = dims.world_size
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the layout's {world} processes")
    if dist.is_initialized():
        raise RuntimeError("layout_rank needs a process without a process group (the fake one is process-global)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        meshes = build_meshes(dims, "cpu", cfg.model)
        dm = build_parallel_model(cfg.model, dims, meshes, cfg.train.seed, 
                                  offset=cfg.parallel.pp_layer_offset, recompute=cfg.train.recompute,
                                  recompute_layers=cfg.parallel.recompute_layers, device=None)
        assert all(p.is_meta for part in dm.parts for p in part.parameters())
        held = held_parameters(dm)
        layers = sorted({int(n.split(".")[2]) for n in held.pop("names") if n.startswith("model.layers.")})
        stages = [getattr(p, "stage_index", 0) for p in dm.parts]
        return {"rank": rank, "world_size": world, "pp_rank": meshes.pp_rank, "dp_rank": meshes.dp_rank,
                "tp_rank": meshes.tp_rank, "stages": stages, "layers": layers,
                "mtp": any(len(getattr(p.model, "mtp", None) or []) for p in dm.parts), **held}
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    """`python -m dsv3.parallel.fake CONFIG RANK [SECTION.KEY=VALUE ...]`: one JSON line for that rank."""
    import json

    from dsv3.config.train import load_run_config

    cfg = load_run_config(argv[0], argv[2:])
    torch.set_num_threads(1)
    print(json.dumps(layout_rank(cfg, int(argv[1]))))
    return 0


if __name__ == "__main__":
    import sys

    from dsv3.errors import UserError

    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
