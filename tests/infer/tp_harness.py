"""Multi-process harness for the tensor/expert-parallel inference tests: N gloo ranks on 127.0.0.1,
each loading its shard (`load_sharded`) and running the same `LLMEngine` in lockstep; rank 0's
results come back (`tests/parallel/spawn_harness.py` spawns). Jobs run one after another inside one
spawn (process start-up is the cost)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from spawn_harness import spawn as _spawn  # noqa: E402


def greedy(n: int, routes: bool = False):
    from dsv3.infer.sampling import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, return_routed_experts=routes)


SAMPLED = dict(temperature=0.9, top_p=0.9, max_tokens=16, min_tokens=16, seed=7, n=2)
"""The seeded sampled request every layout runs (n=2: two seeded generators)."""


def _engine(ckpt: str, tp: int, ep: int, device: str = "cpu", **kw):
    from dsv3.infer.engine import LLMEngine
    from dsv3.infer.parallel import ParallelContext

    ctx = ParallelContext(None, tp_size=tp, ep_size=ep)
    if device == "cuda":  # one GPU per rank (NCCL)
        device = f"cuda:{ctx.rank}"
        torch.cuda.set_device(device)
    return LLMEngine.from_pretrained(ckpt, dtype=torch.float32, device=device, parallel=ctx, block_size=4, num_gpu_blocks=96,
                                     max_num_batched_tokens=16, **kw), ctx


def generate_job(ckpt: str, tp: int, ep: int, prompts: list[list[int]], n: int, speculative: bool = False,
                 quantization: str | None = None, device: str = "cpu") -> dict:
    """Greedy n tokens for every prompt (one batch), then a seeded sampled request; weight/cache bytes."""
    from dsv3.infer.parallel import weight_bytes
    from dsv3.infer.sampling import SamplingParams

    engine, ctx = _engine(ckpt, tp, ep, device, speculative=speculative, quantization=quantization)
    routes: dict = {}
    out = run(engine, {str(i): (p, greedy(n, routes=True)) for i, p in enumerate(prompts)}, routes)
    sampled = run(engine, {"s": (prompts[0], SamplingParams(**SAMPLED))})
    every_rank = [None] * ctx.world  # each rank's routed experts: the same global ids everywhere
    torch.distributed.all_gather_object(every_rank, routes)
    return {"greedy": [out[str(i)][0] for i in range(len(prompts))], "sampled": sampled["s"],
            "routes": [routes[str(i)] for i in range(len(prompts))], "routes_every_rank_equal": all(r == routes for r in every_rank),
            "bytes": weight_bytes(engine.model, ctx), "cache_bytes_per_token": engine.cache_info()["bytes_per_token"]}


def run(engine, requests: dict, routes: dict | None = None) -> dict[str, list[list[int]]]:
    """Each request's completions' token ids; `routes` gets their routed experts (return_routed_experts)."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, None, prompt, params)
    out = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for o in engine.step():
            if o.finished:
                out[o.request_id] = [c.token_ids for c in o.outputs]
                if routes is not None:
                    routes[o.request_id] = [c.routed_experts for c in o.outputs]
    return out


def spawn(world: int, jobs: list) -> list[dict]:
    """Run `generate_job(*job)` for each job on `world` gloo ranks (tests/parallel's harness); rank 0's result per job."""
    return _spawn(world, jobs, "tp_harness:generate_job")
