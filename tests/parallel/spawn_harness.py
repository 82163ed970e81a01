"""Spawned gloo ranks for tests that check one rank's state directly (slice reads, sharded inference):
`spawn(world, jobs, fn_name)` runs `fn_name(*job)` on every rank (a name here, or "module:function"
for another test module's job) and returns rank 0's result per job. Training layouts are tested through
the shipped trainer instead (`parallel_harness.launch` / `multi_run`).
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import traceback

import torch

from dsv3.config.schema import ModelConfig
from parallel_harness import free_port


def _worker(rank: int, world: int, port: int, fn_name: str, jobs: list, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import faulthandler
    import torch.distributed as dist

    faulthandler.dump_traceback_later(float(os.environ.get("DSV3_TEST_HANG_S", "170")), exit=True)  # a hang prints stacks

    dist.init_process_group(os.environ.get("DSV3_TEST_BACKEND", "gloo"), rank=rank, world_size=world)  # nccl: GPU tests
    results = []
    module, _, name = fn_name.rpartition(":")  # "module:function" runs another test module's job
    fn = getattr(importlib.import_module(module), name) if module else globals()[fn_name]
    for job in jobs:
        try:
            results.append({"ok": fn(*job)})
        except Exception as e:  # report per job; the other jobs still run
            results.append({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
            dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()



def spawn(world: int, jobs: list, fn_name: str) -> list[dict]:
    """Run `fn_name(*job)` for each job on `world` gloo ranks; rank 0's result per job."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        mp.spawn(_worker, args=(world, free_port(), fn_name, jobs, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)



def init_from_slices_job(cfg: ModelConfig, par: dict, ckpt: str) -> list[dict]:
    """`build_parallel_model(fill=InitSource(cfg, ckpt).fill)` (the trainer's `train.init_from`) under `par`, with safetensors' `safe_open` wrapped to count
    what is read: per rank, bytes read, get_tensor calls, stored tensors read whole although this rank
    holds only a shard of their parameter (for stacked experts: any expert it does not hold), and the
    largest difference from the checkpoint's boxes."""
    import safetensors
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from dsv3.checkpoint.io import from_pretrained
    from dsv3.checkpoint.slices import SliceReader
    from dsv3.parallel import ParallelDims, build_meshes
    from dsv3.parallel.build import build_parallel_model
    from dsv3.parallel.init import canonical_name, local_box
    from dsv3.train.init_from import InitSource

    log = {"bytes": 0, "get_tensor": 0, "full": set(), "read": set()}
    real_open = safetensors.safe_open

    class Slice:
        def __init__(self, sl, name):
            self.sl, self.name = sl, name

        def __getattr__(self, k):
            return getattr(self.sl, k)

        def __getitem__(self, box):
            t = self.sl[box]
            log["bytes"] += t.numel() * t.element_size()
            log["read"].add(self.name)
            if list(t.shape) == list(self.sl.get_shape()):
                log["full"].add(self.name)
            return t

    class Handle:
        def __init__(self, *a, **kw):
            self.h = real_open(*a, **kw)

        def keys(self):
            return self.h.keys()

        def get_slice(self, name):
            return Slice(self.h.get_slice(name), name)

        def get_tensor(self, name):
            log["get_tensor"] += 1
            return self.h.get_tensor(name)

    dims = ParallelDims.from_config(par)
    meshes = build_meshes(dims, "cpu", cfg)
    safetensors.safe_open = Handle
    try:
        source = InitSource(cfg, ckpt)
        try:
            dm = build_parallel_model(cfg, dims, meshes, 0, device=torch.device("cpu"), fill=source.fill)
        finally:
            source.close()
    finally:
        safetensors.safe_open = real_open
    ref = from_pretrained(ckpt, dtype="float32").state_dict()
    sources = SliceReader(ckpt, cfg).sources
    diff, local_bytes, sharded_stored, other_experts, seen = 0.0, 0, set(), set(), set()
    for part in dm.parts:
        for name, t in list(part.named_parameters()) + list(part.named_buffers()):
            name = canonical_name(name)
            if name not in ref or id(t) in seen:
                continue
            seen.add(id(t))
            local, offset, shape = local_box(t)
            box = tuple(slice(o, o + n) for o, n in zip(offset, local.shape))
            diff = max(diff, float((local.detach() - ref[name][box]).abs().max()) if local.numel() else 0.0)
            local_bytes += local.numel() * 4
            if isinstance(t, DTensor) and local.numel() < t.numel():
                src = sources[name]
                if src[0] == "expert":
                    other_experts |= {n for e, n in src[1].items() if not offset[0] <= e < offset[0] + local.shape[0]}
                else:
                    sharded_stored.add(src[1])
    full = sorted((log["full"] & sharded_stored) | (log["read"] & other_experts))
    mine = {"bytes_read": log["bytes"], "get_tensor_calls": log["get_tensor"], "full_reads_of_sharded": full,
            "sharded_checked": len(sharded_stored) + len(other_experts),
            "local_bytes": local_bytes, "max_abs_diff": diff, "model_bytes": sum(v.numel() * 4 for v in ref.values())}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone
