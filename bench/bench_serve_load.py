"""Load test: 500 requests at concurrency 16 with mixed lengths against `dsv3 serve` -> 0 errors, and the
server's memory flat after warm-up.

    flock /tmp/dsv3-bench.lock python bench/bench_serve_load.py --model /tmp/dsv3-tiny

Prompts are random with lengths spread +-90 % around --input-len / --output-len, half to
/v1/completions and half to /v1/chat/completions, all streamed. The server's RSS is sampled every
0.25 s; "flat" compares the peak RSS of the last quarter of the run with the peak of the second
quarter (after warm-up). Writes bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import REPO, Server, provenance  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--num-prompts", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=96)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--server-args", default="--dtype float32 --device cpu --max-num-seqs 16")
    p.add_argument("--max-growth-mb", type=float, default=50.0, help="allowed RSS growth after warm-up")
    args = p.parse_args(argv)

    import aiohttp
    import httpx

    from dsv3.bench.datasets import random_dataset
    from dsv3.bench.metrics import calculate_metrics, format_table
    from dsv3.bench.serve import request_func, build_payload, write_json_atomic
    from dsv3.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    reqs = random_dataset(tok, args.num_prompts, args.input_len, args.output_len, range_ratio=0.9, seed=1)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    with Server(args.model, args.server_args.split(), Path("/tmp/dsv3-bench-serve-load.log")) as server:
        def sample() -> None:
            while not stop.is_set():
                samples.append((time.perf_counter(), server.rss_mb()))
                time.sleep(0.25)

        async def run():
            sem = asyncio.Semaphore(args.concurrency)
            connector = aiohttp.TCPConnector(limit=args.concurrency)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as client:
                async def one(i, r):
                    backend = "openai-chat" if i % 2 else "openai"
                    url = server.root + ("/v1/chat/completions" if i % 2 else "/v1/completions")
                    async with sem:
                        return await request_func(client, url, build_payload(backend, "dsv3", r, True, 0.0), {},
                                                  r.prompt_len)
                t0 = time.perf_counter()
                outs = await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
                return outs, t0, time.perf_counter() - t0

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        outputs, t0, dur = asyncio.run(run())
        stop.set()
        sampler.join()
        health = httpx.get(server.root + "/health").status_code
        metrics_text = httpx.get(server.root + "/metrics").text

    m = calculate_metrics([r.prompt_len for r in reqs], outputs, dur, lambda t: len(tok.encode(t)),
                          ["ttft", "tpot", "itl", "e2el"], [50, 99])
    print(format_table(m, dur, len(outputs) - m.completed, args.concurrency, float("inf"),
                       ["ttft", "tpot", "itl", "e2el"], [50, 99]))
    run_samples = [(t - t0, rss) for t, rss in samples if t >= t0]
    q = dur / 4
    warm = max((rss for t, rss in run_samples if q <= t < 2 * q), default=float("nan"))
    last = max((rss for t, rss in run_samples if t >= 3 * q), default=float("nan"))
    errors = [o.error for o in outputs if not o.success]
    wrong_len = sum(1 for r, n in zip(reqs, m.output_lens) if n != r.expected_output_len)
    used = [line for line in metrics_text.splitlines() if line.startswith("dsv3:kv_cache_blocks") and "used" in line]
    result = {
        **provenance(), "model": args.model, "num_prompts": args.num_prompts, "concurrency": args.concurrency,
        "input_len_range": [min(r.prompt_len for r in reqs), max(r.prompt_len for r in reqs)],
        "output_len_range": [min(r.expected_output_len for r in reqs), max(r.expected_output_len for r in reqs)],
        "duration_s": dur, "completed": m.completed, "errors": len(errors), "first_errors": errors[:3],
        "wrong_output_lengths": wrong_len, "health_after": health,
        "kv_cache_used_blocks_after": used[0].split()[-1] if used else None,
        "request_throughput": m.request_throughput, "output_throughput": m.output_throughput,
        "mean_ttft_ms": m.stats["mean_ttft_ms"], "p99_ttft_ms": m.stats["p99_ttft_ms"],
        "mean_tpot_ms": m.stats["mean_tpot_ms"], "p99_tpot_ms": m.stats["p99_tpot_ms"],
        "rss_mb_peak_second_quarter": warm, "rss_mb_peak_last_quarter": last, "rss_growth_mb": last - warm,
        "rss_mb_samples": [[round(t, 2), round(r, 1)] for t, r in run_samples[:: max(1, len(run_samples) // 200)]],
    }
    result["pass"] = (not errors and wrong_len == 0 and health == 200 and result["rss_growth_mb"] <= args.max_growth_mb)
    out = REPO / "bench" / "results" / "serve_load.json"
    write_json_atomic(out, result)
    print({k: result[k] for k in ("completed", "errors", "wrong_output_lengths", "rss_mb_peak_second_quarter",
                                  "rss_mb_peak_last_quarter", "rss_growth_mb", "kv_cache_used_blocks_after", "pass")})
    print(f"saved {out}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
