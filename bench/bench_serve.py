"""Serving benchmark: `dsv3 bench serve` against a real `dsv3 serve` process, at several concurrencies.

    flock /tmp/dsv3-bench.lock python bench/bench_serve.py --model /tmp/dsv3-tiny --name tiny \
        --concurrency 1 8 --num-prompts 32 --input-len 64 --output-len 64

Starts the server (127.0.0.1, a free port), runs the vLLM-style benchmark once per concurrency with
the same random prompts (`--ignore-eos`: exact output lengths) in `--repeats` interleaved rounds, and writes
bench/results/serve_{name}.json: each concurrency's best run (vLLM result keys), every round's figure, and the output-throughput ratio of
the highest concurrency to concurrency 1. The acceptance bar is ratio >= 4 at concurrency 8.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m dsv3 serve` as a subprocess; stopped on exit."""

    def __init__(self, model: str, extra: list[str], log: Path):
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "dsv3", "serve", "--model", model, "--port", str(self.port),
                    "--served-model-name", "dsv3", "--log-level", "warning", *extra]
        self.log = log

    def __enter__(self):
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._logf, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: see {self.log}")
            try:
                if httpx.get(self.root + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("server did not start in 600 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._logf.close()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def provenance() -> dict:
    """`dsv3.bench.provenance` (command, commit, load, CPU model and ISA flags, torch) and the date."""
    from dsv3.bench.provenance import provenance as record

    return {**record(REPO), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--name", required=True, help="results go to bench/results/serve_{name}.json")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="rounds over the concurrencies; the best run of each is kept")
    p.add_argument("--backend", default="openai", choices=["openai", "openai-chat"])
    p.add_argument("--server-args", default="--dtype float32 --device cpu",
                   help="extra `dsv3 serve` flags (max-num-seqs is set to the highest concurrency)")
    args = p.parse_args(argv)

    from dsv3.bench.datasets import random_dataset
    from dsv3.bench.metrics import calculate_metrics, format_table, result_json
    from dsv3.bench.serve import benchmark, write_json_atomic
    from dsv3.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    requests = random_dataset(tok, args.num_prompts, args.input_len, args.output_len, seed=0)
    extra = args.server_args.split() + ["--max-num-seqs", str(max(args.concurrency))]
    all_runs: list[dict] = []
    results_dir = REPO / "bench" / "results"
    with Server(args.model, extra, Path(f"/tmp/dsv3-bench-serve-{args.name}.log")) as server:
        # Interleave the concurrencies over --repeats rounds and keep each one's best run: the machine
        # is shared, and load that comes and goes would otherwise favour whichever ran in a quiet moment.
        for rnd in range(args.repeats):
            for c in args.concurrency:
                outputs, dur = asyncio.run(benchmark(server.root, "/v1/completions" if args.backend == "openai"
                                                     else "/v1/chat/completions", args.backend, "dsv3", requests,
                                                     max_concurrency=c, ignore_eos=True, disable_tqdm=True))
                m = calculate_metrics([r.prompt_len for r in requests], outputs, dur, lambda t: len(tok.encode(t)),
                                      ["ttft", "tpot", "itl", "e2el"], [50, 99])
                print(f"round {rnd + 1}/{args.repeats}, concurrency {c}:")
                print(format_table(m, dur, len(outputs) - m.completed, c, float("inf"),
                                   ["ttft", "tpot", "itl", "e2el"], [50, 99]), flush=True)
                res = result_json(m, outputs, [r.prompt_len for r in requests], dur,
                                  {"backend": args.backend, "model_id": args.model, "num_prompts": len(requests),
                                   "request_rate": "inf", "burstiness": 1.0, "max_concurrency": c, "round": rnd})
                for key in ("generated_texts", "itls", "ttfts"):  # keep the result file small
                    res.pop(key)
                res["server_rss_mb"] = server.rss_mb()
                all_runs.append(res)
    runs = [max((r for r in all_runs if r["max_concurrency"] == c), key=lambda r: r["output_throughput"])
            for c in args.concurrency]
    base = runs[0]["output_throughput"]
    summary = {
        "name": args.name, "model": args.model, **provenance(),
        "input_len": args.input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
        "output_throughput_by_concurrency": {str(r["max_concurrency"]): r["output_throughput"] for r in runs},
        "speedup_vs_concurrency_1": {str(r["max_concurrency"]): r["output_throughput"] / base for r in runs},
        "ttft_ms_mean_by_concurrency": {str(r["max_concurrency"]): r["mean_ttft_ms"] for r in runs},
        "tpot_ms_mean_by_concurrency": {str(r["max_concurrency"]): r["mean_tpot_ms"] for r in runs},
        "output_throughput_all_rounds": {str(c): [r["output_throughput"] for r in all_runs if r["max_concurrency"] == c]
                                         for c in args.concurrency},
        "repeats": args.repeats,
        "runs": runs,
    }
    out = results_dir / f"serve_{args.name}.json"
    write_json_atomic(out, summary)
    print(json.dumps({k: summary[k] for k in ("output_throughput_by_concurrency", "speedup_vs_concurrency_1",
                                              "ttft_ms_mean_by_concurrency", "tpot_ms_mean_by_concurrency")}, indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
