"""Load test: 500 requests at concurrency 16 against `dsv3 serve`, one in 20 of them malicious ->
every well-formed request completes, every malformed one gets a 4xx, /health always answers
within 1 s, and the server's memory stays flat after warm-up.

    flock /tmp/dsv3-bench.lock python bench/bench_serve_load.py --model /tmp/dsv3-tiny

Well-formed prompts are random with lengths spread +-90 % around --input-len / --output-len, half
to /v1/completions and half to /v1/chat/completions, all streamed. Every --malicious-every-th
request (default 20; 0 = none) is instead one of `malicious_bodies` (in turn). Issue 10's: sampling
fields the engine cannot hold (top_k 2**63, seed 2**64, n 20000, logprobs 10000 with echo), a 10 MB
body, lone surrogates, 100,000-deep JSON, an empty prompt list / message list, a prompt longer than
the context can hold, an out-of-vocabulary token id; each must get a 4xx. Issue 25's (S2-S7): a
grammar that fails in llguidance (`(a{1000}){1003}`) and a tool-call marker flood forced into the
output (these may be answered or refused; what counts is that nobody else fails), an anyOf of
10,000, a guided_choice of 100,000, 300,000 stop strings, n x prompts = 128 x 256, a schema sent
as a 4000-deep JSON string, a 5000-deep regex `pattern` (each a 4xx), and a connection that never
finishes its headers (the server must close it). A thread polls /health every 0.1 s for the whole
run (its own connection per probe), after 100 probes of the idle server that show what the
machine alone costs (`idle_health_max_s`). The server's RSS is sampled every 0.25 s; "flat" compares the
peak RSS of the last quarter of the run with the peak of the second quarter (after warm-up).
Writes --out (bench/results/serve_load.json) with the command line, the commit and the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
    p.add_argument("--malicious-every", type=int, default=20, help="every Nth request is malicious (0: none)")
    p.add_argument("--max-health-s", type=float, default=1.0, help="slowest /health answer allowed")
    p.add_argument("--idle-health-probes", type=int, default=100, help="/health probes of the idle server first")
    p.add_argument("--slow-headers-wait", type=float, default=30.0,
                   help="seconds a stalled-headers connection may stay open (the server's --header-timeout is 10)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_load.json"), help="result JSON")
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

    bad_at = {i for i in range(args.num_prompts) if args.malicious_every and i % args.malicious_every
              == args.malicious_every - 1}
    health_s: list[float] = []
    health_bad: list[str] = []
    malicious: list[dict] = []
    load_before = os.getloadavg()

    with Server(args.model, args.server_args.split(), Path("/tmp/dsv3-bench-serve-load.log")) as server:
        max_model_len = httpx.get(server.root + "/v1/models", timeout=30).json()["data"][0]["max_model_len"]
        idle_health_s = []  # the same probe on the idle server first: what the machine alone costs
        for _ in range(args.idle_health_probes):
            t = time.perf_counter()
            httpx.get(server.root + "/health", timeout=30)
            idle_health_s.append(time.perf_counter() - t)
            time.sleep(0.1)
        attacks = malicious_bodies(max_model_len)

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.perf_counter(), server.rss_mb()))
                time.sleep(0.25)

        def probe_health() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    code = httpx.get(server.root + "/health", timeout=30).status_code
                    if code != 200:
                        health_bad.append(f"HTTP {code}")
                except httpx.HTTPError as e:
                    health_bad.append(repr(e))
                health_s.append(time.perf_counter() - t)
                time.sleep(0.1)

        async def run():
            sem = asyncio.Semaphore(args.concurrency)
            connector = aiohttp.TCPConnector(limit=args.concurrency)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as client:
                async def attack(k: int):
                    kind, path, body, expect = attacks[k % len(attacks)]
                    t = time.perf_counter()
                    if expect == "closed":
                        status, text = await stalled_headers(server.port, args.slow_headers_wait)
                        ok = status == "closed"
                    else:
                        try:
                            async with client.post(server.root + path, data=body,
                                                   headers={"Content-Type": "application/json"}) as resp:
                                status, text = resp.status, (await resp.read()).decode("utf-8", "replace")
                        except aiohttp.ClientError as e:
                            status, text = None, repr(e)
                        refused = status is not None and 400 <= status < 500 and '"error"' in text
                        ok = refused or (expect == "answered" and status is not None)
                        ok = ok and "panic" not in text.lower()
                    malicious.append({"kind": kind, "status": status, "ok": ok, "seconds": time.perf_counter() - t,
                                      **({} if ok else {"body": text[:300]})})

                async def one(i, r):
                    backend = "openai-chat" if i % 2 else "openai"
                    url = server.root + ("/v1/chat/completions" if i % 2 else "/v1/completions")
                    async with sem:
                        if i in bad_at:
                            return await attack(i // args.malicious_every)
                        return await request_func(client, url, build_payload(backend, "dsv3", r, True, 0.0), {},
                                                  r.prompt_len)
                t0 = time.perf_counter()
                outs = await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
                return [(r, o) for i, (r, o) in enumerate(zip(reqs, outs)) if i not in bad_at], t0, \
                    time.perf_counter() - t0

        threads = [threading.Thread(target=f, daemon=True) for f in (sample, probe_health)]
        for t in threads:
            t.start()
        pairs, t0, dur = asyncio.run(run())
        stop.set()
        for t in threads:
            t.join()
        health = httpx.get(server.root + "/health").status_code
        metrics_text = httpx.get(server.root + "/metrics").text
    reqs, outputs = [r for r, _ in pairs], [o for _, o in pairs]

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
    by_kind: dict[str, dict] = {}
    for a in malicious:
        k = by_kind.setdefault(a["kind"], {"sent": 0, "ok": 0, "statuses": []})
        k["sent"] += 1
        k["ok"] += a["ok"]
        if a["status"] not in k["statuses"]:
            k["statuses"].append(a["status"])
    result = {
        **provenance(), "command": " ".join([sys.executable, *sys.argv]),
        "load_avg_1_5_15_before": list(load_before), "load_avg_1_5_15_after": list(os.getloadavg()),
        "model": args.model, "num_prompts": args.num_prompts, "concurrency": args.concurrency,
        "well_formed": len(reqs), "malicious": len(malicious), "malicious_ok": sum(a["ok"] for a in malicious),
        "malicious_by_kind": by_kind, "malicious_failures": [a for a in malicious if not a["ok"]][:5],
        "health_probes": len(health_s), "health_max_s": max(health_s, default=float("nan")),
        "health_p99_s": sorted(health_s)[int(0.99 * (len(health_s) - 1))] if health_s else float("nan"),
        "health_failures": health_bad[:5],
        "idle_health_probes": len(idle_health_s), "idle_health_max_s": max(idle_health_s, default=float("nan")),
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
    result["pass"] = (not errors and wrong_len == 0 and health == 200 and result["rss_growth_mb"] <= args.max_growth_mb
                      and result["malicious_ok"] == len(malicious) == len(bad_at) and not health_bad
                      and result["health_max_s"] < args.max_health_s)
    out = Path(args.out)
    write_json_atomic(out, result)
    print({k: result[k] for k in ("well_formed", "completed", "errors", "wrong_output_lengths", "malicious",
                                  "malicious_ok", "health_probes", "health_max_s", "idle_health_max_s",
                                  "rss_mb_peak_second_quarter",
                                  "rss_mb_peak_last_quarter", "rss_growth_mb", "kv_cache_used_blocks_after", "pass")})
    print(f"saved {out}")
    return 0 if result["pass"] else 1


async def stalled_headers(port: int, wait_s: float) -> tuple[str, str]:
    """Open a connection, send half a request's headers, and wait for the server to close it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(1 << 16), timeout=wait_s)
        return ("closed", "") if data == b"" else ("answered", data[:300].decode("latin-1"))
    except asyncio.TimeoutError:
        return "held", f"still open after {wait_s} s"
    except ConnectionError as e:
        return "closed", repr(e)
    finally:
        writer.close()


def malicious_bodies(max_model_len: int) -> list[tuple[str, str | None, bytes, str]]:
    """(kind, path, raw body, expected answer) of each malicious request kind: issue 10's list, then
    issue 25's (S2-S7). Expected: "4xx" a refusal; "answered" any HTTP answer (a 4xx, or a 200 when the
    server can serve it: what matters is that the other requests do not fail); "closed" the server
    closes the connection."""
    m = '"model": "dsv3"'

    def cmpl(extra: str) -> bytes:
        return ('{%s, "prompt": "hello", "max_tokens": 4, %s}' % (m, extra)).encode()

    chat_hi = '"messages": [{"role": "user", "content": "hi"}]'
    deep = 100_000
    issue10 = [
        ("top_k_2**63", "/v1/completions", cmpl(f'"top_k": {2**63}, "temperature": 1.0')),
        ("huge_body_10MB", "/v1/chat/completions",
         ('{%s, "messages": [{"role": "user", "content": "%s"}]}' % (m, "a" * (10 << 20))).encode()),
        ("logprobs_10000_echo", "/v1/completions", cmpl('"logprobs": 10000, "echo": true')),
        ("n_20000", "/v1/completions", cmpl('"n": 20000')),
        ("lone_surrogate_content", "/v1/chat/completions",
         ('{%s, "messages": [{"role": "user", "content": "a\\ud800b"}]}' % m).encode()),
        ("deep_json_100000", "/v1/chat/completions", ('{%s, "messages": ' % m + "[" * deep + "]" * deep + "}").encode()),
        ("empty_prompt_list", "/v1/completions", ('{%s, "prompt": [], "max_tokens": 4}' % m).encode()),
        ("oversized_prompt", "/v1/completions",
         ('{%s, "prompt": "%s", "max_tokens": 4}' % (m, "z" * (max_model_len * 128 + 1))).encode()),
        ("seed_2**64", "/v1/completions", cmpl(f'"seed": {2**64}')),
        ("lone_surrogate_model", "/v1/chat/completions", ('{"model": "\\udfff", %s}' % chat_hi).encode()),
        ("empty_messages", "/v1/chat/completions", ('{%s, "messages": []}' % m).encode()),
        ("token_id_out_of_vocab", "/v1/completions", ('{%s, "prompt": [1, 10000000000], "max_tokens": 4}' % m).encode()),
    ]
    return [(kind, path, body, "4xx") for kind, path, body in issue10] + issue25_bodies()


def issue25_bodies() -> list[tuple[str, str | None, bytes, str]]:
    import json

    from dsv3.data.chat_template import CALL_BEGIN, CALLS_BEGIN, SEP

    def chat(**fields) -> bytes:
        return json.dumps({"model": "dsv3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                           **fields}).encode()

    def cmpl(**fields) -> bytes:
        return json.dumps({"model": "dsv3", "prompt": "hello", "max_tokens": 4, **fields}).encode()

    flood = CALLS_BEGIN + f"({CALL_BEGIN}{SEP}\n```json\n)+"
    tool = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    deep_pattern = "(" * 5000 + "a" + ")" * 5000
    return [
        ("S2_failing_grammar", "/v1/completions", cmpl(guided_regex="(a{1000}){1003}"), "answered"),
        ("S4_tool_marker_flood", "/v1/chat/completions",
         chat(tools=tool, guided_regex=flood, max_tokens=48, temperature=0), "answered"),
        ("S5_anyOf_10000", "/v1/chat/completions",
         chat(guided_json={"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "string"}}}
                                     for i in range(10_000)]}), "4xx"),
        ("S5_guided_choice_100000", "/v1/completions", cmpl(guided_choice=[f"c{i}" for i in range(100_000)]), "4xx"),
        ("S5_stop_300000", "/v1/completions", cmpl(stop=["a"] * 300_000), "4xx"),
        ("S5_n_x_prompts_32768", "/v1/completions", cmpl(n=128, prompt=["hi"] * 256), "4xx"),
        ("S7_string_schema_4000_deep", "/v1/chat/completions",
         chat(guided_json='{"anyOf": [' * 4000 + "{}" + "]}" * 4000), "4xx"),
        ("S7_pattern_5000_deep", "/v1/chat/completions",
         chat(guided_json={"type": "string", "pattern": deep_pattern}), "4xx"),
        ("S7_stalled_headers", None, b"", "closed"),
    ]


if __name__ == "__main__":
    sys.exit(main())
