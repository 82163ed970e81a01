"""Data-parallel scaling on CPU (gloo): step time and tokens/s for 1, 2 and 4 processes.

    flock /tmp/dsv3-bench.lock python bench/bench_scaling.py            # configs/tiny.yaml, FSDP2

Weak scaling: every process trains `--batch` sequences of `--seq` tokens per step (global batch
= batch x processes), one thread per process (OMP_NUM_THREADS=1), the shipped trainer with FSDP2
over all processes (`parallel.data_parallel` = N; N = 1 is the one-process trainer). Step time is the median of `--steps` timed steps after `--warmup`.
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

from dsv3.bench.provenance import provenance  # noqa: E402


def _run_config(world: int, args: dict, layout: dict, data_prefix: str, out_dir: str):
    from dsv3.config.load import to_dict
    from dsv3.config.presets import load_model_config
    from dsv3.config.train import run_config_from_dict

    model = load_model_config(REPO / "configs" / "tiny.yaml")
    cfg = run_config_from_dict({
        "model": to_dict(model), "data": {"data_path": [data_prefix], "split": "100,0,0", "seq_length": args["seq"]},
        "train": {"steps": args["warmup"] + args["steps"], "batch_size": args["batch"], "seed": 0, "device": "cpu", "threads": 1},
        "lr_schedule": {"learning_rate": 1e-4}, "eval": {"eval_steps": 0, "eval_at_end": False},
        "checkpoint": {"output_dir": out_dir, "save_steps": 0, "save_at_end": False, "export_hf": False},
        "logging": {"progress_bar": False, "plots": False}, "parallel": {"micro_batch_num": 1, **layout}})
    cfg.validate()
    return cfg


def _worker(rank: int, world: int, port: int, args: dict, layout: dict, data_prefix: str, out: str) -> None:
    """One rank: the shipped trainer (`Trainer`, its strategy built from `layout`), timed step by step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from dsv3.train.trainer import Trainer

    trainer = Trainer(_run_config(world, args, layout, data_prefix, os.path.join(os.path.dirname(out), "run")), quiet=True)
    sync = dist.barrier if world > 1 else (lambda: None)
    times = []
    for i in range(args["warmup"] + args["steps"]):
        sync()
        t0 = time.perf_counter()
        trainer.train_step()
        sync()
        if i >= args["warmup"]:
            times.append(time.perf_counter() - t0)
    B = args["batch"] * world
    if rank == 0:
        step = statistics.median(times)
        Path(out).write_text(json.dumps({"processes": world, "layout": layout, "step_s": step,
                                         "tokens_per_s": B * args["seq"] / step, "step_times_s": times}))
    trainer.close()


def _write_data(prefix: str, vocab: int, n_tokens: int) -> None:
    """Random token documents (timing only) as a .bin/.idx pair."""
    import numpy as np

    from dsv3.data.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin")
    rng = np.random.default_rng(0)
    for _ in range(n_tokens // 1024 + 1):
        b.add_document(rng.integers(2, vocab, 1024), [1024])
    b.finalize(prefix + ".idx")


def measure(world: int, layout: dict, args: dict) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from dsv3.config.presets import load_model_config

    with tempfile.TemporaryDirectory() as d:
        out, prefix = os.path.join(d, "r.json"), os.path.join(d, "rand_text_document")
        vocab = load_model_config(REPO / "configs" / "tiny.yaml").vocab_size
        _write_data(prefix, vocab, 2 * (args["warmup"] + args["steps"]) * args["batch"] * world * (args["seq"] + 1))
        os.environ["OMP_NUM_THREADS"] = "1"
        mp.spawn(_worker, args=(world, port, args, layout, prefix, out), nprocs=world, join=True)
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
              "command": "flock /tmp/dsv3-bench.lock python bench/bench_scaling.py " + " ".join(sys.argv[1:]),
              "provenance": provenance(REPO)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    for r in runs:
        print(f"N={r['processes']} {r['layout']}: efficiency {r['scaling_efficiency']:.2f}")


if __name__ == "__main__":
    main()
