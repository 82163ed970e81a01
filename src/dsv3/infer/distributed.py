"""Starting one engine over several processes: `LLM(..., tensor_parallel_size=N)`, `--tensor-parallel-size N`.

Two launch shapes, one code path (`start_engine`):
- **spawned** (one machine, as vLLM): the calling process becomes rank 0 and starts ranks 1..N-1
  as fresh interpreters (`dsv3.infer.worker`: they never re-run the caller's script, so a plain
  top-level script or `python -c` works without a main guard), rendezvous on 127.0.0.1 at a free
  port; gloo on CPU, NCCL on CUDA (device cuda:RANK). A watchdog thread turns a worker's death into
  one log line and exit 1. `shutdown()` joins the workers and destroys the process group, so the
  same process can start another engine.
- **external** (torchrun / `dsv3 launch`, any number of machines): every process runs the same
  verb; RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR come from the launcher, which stops the job when
  a worker dies.

Every rank loads the model and builds an engine with the same cache geometry; rank 0 keeps it (its
runner wrapped in `executor.DriverRunner`), the others run `executor.follow` and leave. Start-up
errors on any rank (a bad checkpoint, a size that does not divide) are gathered, so rank 0 raises
the first one as one `UserError` line and every process exits 2, never a hang.

Model placement: `_load_model`: each rank reads only its slices of the checkpoint and holds its shard
(`dsv3.infer.parallel`: heads, vocab and MLP widths split over the ranks, routed experts placed across
them with expert parallel); the runner's collectives give every rank the same full logits.
"""

from __future__ import annotations

import argparse
import atexit
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

from dsv3.errors import UserError


@dataclass
class EngineSpec:
    """What every rank needs to build its part of the engine (picklable: it goes to spawned workers)."""

    model_dir: str
    tensor_parallel_size: int
    enable_expert_parallel: bool = False
    dtype: Optional[str] = None
    device: Optional[str] = None
    engine_kwargs: dict = field(default_factory=dict)
    threads: Optional[int] = None
    """torch CPU threads of each rank (set by rank 0 before it starts the others)."""


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """--tensor-parallel-size / --enable-expert-parallel (serve, bench throughput|latency, generate)."""
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="run the model over N processes: spawned on this machine (gloo on CPU, NCCL on GPU), or under "
                        "torchrun / `dsv3 launch` the launched processes (default there: their number; else 1)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="place the routed experts across the tensor-parallel ranks (vLLM's flag)")


def external_env() -> Optional[tuple[int, int, int]]:
    """(rank, world size, local rank) when launched by torchrun / `dsv3 launch` with several workers."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def timeout_s() -> int:
    """Seconds a collective may wait (`dsv3 launch` sets DSV3_DIST_TIMEOUT from CLUSTER_TIME_OUT)."""
    return int(os.environ.get("DSV3_DIST_TIMEOUT", "600"))


def check_sizes(model_dir: str, tp: int, ep: bool, flag: str = "tensor_parallel_size") -> None:
    """Before any process starts: the layout's one-line size errors (`ParallelContext.validate`, the
    check every rank repeats when it loads its shard), from config.json alone."""
    from pathlib import Path

    from dsv3.config.hf import load_hf_config

    if tp < 1:
        raise UserError(f"{flag} must be >= 1, got {tp}")
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: not a model directory (no config.json)")
    try:
        cfg = load_hf_config(path)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    try:
        _context(tp, ep, rank=0).validate(cfg)
    except UserError as e:
        raise UserError(f"{flag} {tp}{' with expert parallel' if ep else ''}: {e}") from None


def _context(world: int, ep: bool, rank=None):
    """The inference layout of `world` ranks: heads and vocab split over all of them; routed experts
    whole per rank with expert parallel, else each expert split over all ranks."""
    from dsv3.infer.parallel import ParallelContext

    return ParallelContext(None, tp_size=world, ep_size=world if ep else 1,
                           **({"rank": rank, "world": world} if rank is not None else {}))


def start_engine(spec: EngineSpec, tokenizer: Any = None):
    """Rank 0: the engine, its followers running. A follower under torchrun: serves rank 0, then exits 0."""
    import torch.distributed as dist

    tp = spec.tensor_parallel_size
    check_sizes(spec.model_dir, tp, spec.enable_expert_parallel)
    env = external_env()
    backend = "nccl" if _device_type(spec) == "cuda" else "gloo"
    if env is not None:
        rank, world, local_rank = env
        if world != tp:
            raise UserError(f"tensor_parallel_size {tp} does not match the {world} processes launched "
                            "(torchrun / dsv3 launch WORKER_NUM): they must be equal")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
        workers = None
    else:
        from dsv3.infer.worker import Workers

        if dist.is_initialized():
            raise UserError("tensor_parallel_size > 1: this process already has a torch.distributed process group "
                            "(another engine not shut down, or the script's own): call shutdown() on it first")
        rank, world, local_rank = 0, tp, 0
        port = _free_port()
        workers = Workers(spec, port, restore_threads=set_rank_threads(spec, world))
        workers.watch()  # from now on: a worker that dies (even before the rendezvous) is one line, exit 1
        try:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=world,
                                    timeout=timedelta(seconds=timeout_s()))
        except Exception:
            _teardown(workers)
            raise
    return _join(spec, rank, world, local_rank, tokenizer, workers)


def _device_type(spec: EngineSpec) -> str:
    if spec.device not in (None, "auto"):
        return "cuda" if str(spec.device).startswith("cuda") else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def set_rank_threads(spec: EngineSpec, world: int) -> Optional[int]:
    """CPU ranks of a spawned engine share the machine's free cores (`dsv3.threads`: $DSV3_NUM_THREADS /
    $OMP_NUM_THREADS / --threads exported by the CLI apply to each rank as given). Rank 0 chooses once
    and records the count in `spec` for the others; returns its previous count (restored at shutdown)."""
    if _device_type(spec) != "cpu":
        return None
    import torch

    from dsv3 import threads

    before = torch.get_num_threads()
    if spec.threads is None:  # rank 0: its choice is the one `dsv3.threads.announce` logs
        spec.threads = threads.apply(threads.choose(local_ranks=world)).threads
    torch.set_num_threads(spec.threads)
    return before


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_model(spec: EngineSpec, device, dtype, rank: int, world: int):
    """(this rank's shard of the model, its ParallelContext): each rank reads only its slices of the
    checkpoint (`dsv3.infer.parallel_load.load_sharded`)."""
    from dsv3.infer.parallel_load import load_sharded

    ctx = _context(world, spec.enable_expert_parallel)
    model = load_sharded(spec.model_dir, ctx, dtype, device, mtp=True if spec.engine_kwargs.get("speculative") else False)
    return model, ctx


def _gather_errors(group, rank: int, world: int, err: Optional[str], extra: Any = None) -> list:
    import torch.distributed as dist

    got: list = [None] * world
    dist.all_gather_object(got, (rank, err, extra), group=group)
    bad = [(r, e) for r, e, _ in got if e]
    if bad:
        r, e = bad[0]
        raise UserError(e if r == rank or rank != 0 else f"rank {r}: {e}")
    return [x for _, _, x in got]


def _attempt(fn):
    """(result, None) or (None, one-line error) — user errors as they are, others with their type."""
    try:
        return fn(), None
    except (UserError, ValueError) as e:
        return None, str(e)
    except Exception as e:  # a real fault on one rank: still one line on rank 0, details in that rank's log
        import traceback

        traceback.print_exc()
        return None, f"{type(e).__name__}: {e}"


def _teardown(workers) -> None:
    """Rank 0: join the spawned followers (if any), restore its thread count, destroy the process group."""
    import torch
    import torch.distributed as dist

    if workers is not None:
        workers.stop()
        if workers.restore_threads is not None:
            torch.set_num_threads(workers.restore_threads)
    if dist.is_initialized():
        dist.destroy_process_group()


def _join(spec: EngineSpec, rank: int, world: int, local_rank: int, tokenizer, workers):
    import torch
    import torch.distributed as dist

    from dsv3.infer.engine import DEFAULT_GPU_CACHE_FRACTION, LLMEngine
    from dsv3.infer.executor import DriverRunner, follow
    from dsv3.infer.loading import resolve_dtype

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s()))  # the control plane, always CPU
    device = torch.device(f"cuda:{local_rank}" if _device_type(spec) == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = resolve_dtype(spec.dtype, device)
    try:
        loaded, err = _attempt(lambda: _load_model(spec, device, dtype, rank, world))
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" and err is None else 0
        frees = _gather_errors(group, rank, world, err, free)
        model, ctx = loaded
        kw = dict(spec.engine_kwargs)  # quantization: applied by the engine, after sharding
        if device.type == "cuda" and kw.get("num_gpu_blocks") is None and kw.get("cache_bytes") is None:
            kw["cache_bytes"] = int(min(frees) * DEFAULT_GPU_CACHE_FRACTION)  # the same cache on every rank
        engine, err = _attempt(lambda: LLMEngine(model, tokenizer if rank == 0 else None, device=device, dtype=dtype,
                                                 parallel=ctx, **kw))
        _gather_errors(group, rank, world, err)
    except UserError:
        _teardown(workers)
        raise
    if rank != 0:
        follow(engine.runner, group, rank)
        dist.destroy_process_group()
        raise SystemExit(0)

    def cleanup() -> None:
        """Join the followers, destroy the process group, restore the thread count: the process can
        build another multi-process engine (a second `LLM(..., tensor_parallel_size=N)`)."""
        atexit.unregister(engine.shutdown)
        _teardown(workers)

    if workers is not None:
        workers.started = True
    engine.runner = DriverRunner(engine.runner, group, world, on_shutdown=cleanup,
                                 **({"on_fatal": workers.explain} if workers is not None else {}))
    engine.parallel = {"tensor_parallel_size": world, "enable_expert_parallel": spec.enable_expert_parallel}
    atexit.register(engine.shutdown)
    return engine
