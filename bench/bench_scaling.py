"""Data-parallel scaling on CPU (gloo): step time and tokens/s for 1, 2 and 4 processes.

    flock /tmp/dsv3-bench.lock python bench/bench_scaling.py            # configs/tiny.yaml, FSDP2

Weak scaling: every process trains `--batch` sequences of `--seq` tokens per step (global batch
= batch x processes), one thread per process (OMP_NUM_THREADS=1), FSDP2 over all processes
(`dsv3.parallel`, dp = N). Step time is the median of `--steps` timed steps after `--warmup`.
Scaling efficiency(N) = tokens/s(N) / (N x tokens/s(1)); it is bounded by the machine's physical
cores (recorded in the JSON): past that, processes share cores and efficiency falls as cores/N.
The N > 1 runs are repeated with the experts split over all processes (expert_parallel = N) to show
the cost of the all-to-all token exchange.
Writes bench/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _worker(rank: int, world: int, port: int, args: dict, layout: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from dsv3.config.presets import load_model_config
    from dsv3.model.transformer import Transformer
    from dsv3.parallel import ParallelDims, build_meshes, build_optimizer, parallelize, train_step

    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_model_config(REPO / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.reset_parameters()
    dims = ParallelDims.from_config(layout)
    dm = parallelize(model, dims, build_meshes(dims, "cpu", cfg))
    opt = build_optimizer(dm, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    B = args["batch"] * world
    times = []
    for i in range(args["warmup"] + args["steps"]):
        window = torch.randint(0, cfg.vocab_size, (B, args["seq"] + 1), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        train_step(dm, opt, window)
        dist.barrier()
        if i >= args["warmup"]:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        step = statistics.median(times)
        Path(out).write_text(json.dumps({"processes": world, "layout": layout, "step_s": step,
                                         "tokens_per_s": B * args["seq"] / step, "step_times_s": times}))
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, layout: dict, args: dict) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        os.environ["OMP_NUM_THREADS"] = "1"
        mp.spawn(_worker, args=(world, port, args, layout, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", default="1,2,4", help="process counts")
    p.add_argument("--batch", type=int, default=4, help="sequences per process per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "scaling.json"))
    a = p.parse_args()
    args = {"batch": a.batch, "seq": a.seq, "steps": a.steps, "warmup": a.warmup}
    procs = [int(x) for x in a.procs.split(",")]
    runs = []
    for n in procs:
        r = measure(n, {"data_parallel": n}, args)
        runs.append(r)
        print(f"fsdp dp={n}: step {r['step_s'] * 1e3:.0f} ms, {r['tokens_per_s']:.0f} tokens/s", flush=True)
        if n > 1:
            r = measure(n, {"data_parallel": n, "expert_parallel": n}, args)
            runs.append(r)
            print(f"fsdp dp={n} ep={n}: step {r['step_s'] * 1e3:.0f} ms, {r['tokens_per_s']:.0f} tokens/s", flush=True)
    base = next((r["tokens_per_s"] for r in runs if r["processes"] == 1), None)
    for r in runs:
        r["scaling_efficiency"] = r["tokens_per_s"] / (r["processes"] * base) if base else None
    result = {"config": "configs/tiny.yaml", "device": "cpu", "backend": "gloo", "torch": torch.__version__,
              "physical_cores": os.cpu_count(), "threads_per_process": 1, "batch_per_process": a.batch, "seq": a.seq,
              "timed_steps": a.steps, "runs": runs,
              "command": "flock /tmp/dsv3-bench.lock python bench/bench_scaling.py " + " ".join(sys.argv[1:])}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    for r in runs:
        print(f"N={r['processes']} {r['layout']}: efficiency {r['scaling_efficiency']:.2f}")


if __name__ == "__main__":
    main()
