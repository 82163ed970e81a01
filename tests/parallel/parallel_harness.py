"""Multi-process harness for the parallel tests: spawn N gloo ranks, run several layouts in one
process group (process start-up dominates on 2 cores), return rank 0's results.

The reference is a plain single-process Transformer stepped with the same AdamW on the same data
(it does not use dsv3.parallel at all).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import tempfile
import traceback

import torch

from dsv3.config.schema import ModelConfig, RopeScaling

STEPS = 3
LR = 3e-3
GAMMA = float(os.environ.get("DSV3_TEST_GAMMA", "1e-3"))
BATCH, SEQ = 8, 32


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


def build_layout(cfg: ModelConfig, par: dict, seed: int = 0):
    """This rank's part under `par` (seed parallel_config names + dp_shard/pipeline_schedule/param_dtype/
    pp_layer_offset/recompute/recompute_layers), built on the meta device and materialised per shard."""
    from dsv3.parallel import ParallelDims, build_meshes
    from dsv3.parallel.build import build_parallel_model

    dims = ParallelDims.from_config(par)
    meshes = build_meshes(dims, "cpu", cfg)
    param_dtype = getattr(torch, par["param_dtype"]) if "param_dtype" in par else None  # FSDP mixed precision
    return build_parallel_model(cfg, dims, meshes, seed, param_dtype=param_dtype, offset=par.get("pp_layer_offset"),
                                recompute=par.get("recompute", "none"), recompute_layers=par.get("recompute_layers"),
                                device=torch.device("cpu"))


def batches(cfg: ModelConfig, steps: int = STEPS, seed: int = 1) -> list[torch.Tensor]:
    """Learnable windows (arithmetic progressions mod vocab, random start and stride), so a few
    steps move the loss enough that a wrong gradient shows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, cfg.vocab_size, (BATCH, 1), generator=g)
        stride = torch.randint(1, 4, (BATCH, 1), generator=g)
        out.append((start + stride * torch.arange(SEQ + 1)) % cfg.vocab_size)
    return out


def reference_losses(cfg: ModelConfig, steps: int = STEPS, micro: int = 1) -> list[float]:
    """Single process, no dsv3.parallel: mean CE + 0.3 · MTP CE, AdamW, bias update."""
    import torch.nn.functional as F

    model = make_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95), foreach=False)
    out = []
    for w in batches(cfg, steps):
        opt.zero_grad()
        ids, labels = w[:, :-1], w[:, 1:]
        logits, mtp = model(ids, return_mtp=True)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        for k, lg in enumerate(mtp, 1):
            loss = loss + 0.3 / len(mtp) * F.cross_entropy(lg[:, :-k].flatten(0, 1), labels[:, k:].flatten())
        if model.aux_loss() is not None:
            loss = loss + model.aux_loss()
        loss.backward()
        with torch.no_grad():
            for m in model.moe_layers():
                c = m.tokens_per_expert
                m.gate.e_score_correction_bias += GAMMA * torch.sign(c.mean() - c)
                c.zero_()
        opt.step()
        out.append(loss.item())
    return out


def run_layout(cfg: ModelConfig, par: dict, steps: int = STEPS) -> list[float]:
    """Inside a worker: build meshes for `par` (seed parallel_config names), step, return losses."""
    from dsv3.parallel import build_optimizer, train_step

    dm = build_layout(cfg, par)
    opt = build_optimizer(dm, lr=LR)
    return [train_step(dm, opt, w, bias_gamma=GAMMA) for w in batches(cfg, steps)]


def held_layout(cfg: ModelConfig, par: dict) -> dict:
    """Every rank's `held_parameters` under `par` (materialised), and the single-process parameter count."""
    import torch.distributed as dist

    from dsv3.parallel.build import held_parameters

    held = held_parameters(build_layout(cfg, par))
    held.pop("names")
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, held)
    model = make_model(cfg)
    return {"ranks": everyone, "model_params": sum(p.numel() for p in model.parameters()),
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, jobs: list, fn_name: str = "run_layout") -> list[dict]:
    """Run `fn_name(*job)` for each job on `world` gloo ranks; rank 0's result per job."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        mp.spawn(_worker, args=(world, free_port(), fn_name, jobs, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def dcp_save_job(cfg: ModelConfig, par: dict, ckpt: str) -> list[float]:
    """Two steps, save model + optimizer, then two more steps: returns losses of steps 3 and 4."""
    from dsv3.parallel import build_optimizer, train_step
    from dsv3.parallel.dcp import save

    dm = build_layout(cfg, par)
    opt = build_optimizer(dm, lr=LR)
    data = batches(cfg, 4)
    for w in data[:2]:
        train_step(dm, opt, w, bias_gamma=GAMMA)
    save(ckpt, dm.parts, opt)
    return [train_step(dm, opt, w, bias_gamma=GAMMA) for w in data[2:]]


def dcp_load_job(cfg: ModelConfig, par: dict, ckpt: str) -> list[float]:
    """A fresh model (different seed) under `par`, loaded from `ckpt`: losses of steps 3 and 4."""
    from dsv3.parallel import build_optimizer, train_step
    from dsv3.parallel.dcp import load

    dm = build_layout(cfg, par, seed=123)
    opt = build_optimizer(dm, lr=LR)
    load(ckpt, dm.parts, opt)
    return [train_step(dm, opt, w, bias_gamma=GAMMA) for w in batches(cfg, 4)[2:]]


def dcp_roundtrip_job(cfg: ModelConfig, ckpt: str) -> dict:
    """Save under dp2 x pp2, then (same process group) load under dp4."""
    saved = dcp_save_job(cfg, {"data_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2}, ckpt)
    loaded = dcp_load_job(cfg, {"data_parallel": 4}, ckpt)
    return {"saved": saved, "loaded": loaded}


def init_from_slices_job(cfg: ModelConfig, par: dict, ckpt: str) -> list[dict]:
    """`build_parallel_model(init_from=ckpt)` under `par`, with safetensors' `safe_open` wrapped to count
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
        dm = build_parallel_model(cfg, dims, meshes, 0, device=torch.device("cpu"), init_from=ckpt)
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
