"""Serving-benchmark maths with vLLM's definitions (`spec/inference.md` §g, `benchmark_serving.py`).

Per request (client clock, streaming): TTFT = first chunk carrying `choices` - send time; ITL =
gaps between later such chunks (per chunk, not per token); E2EL = last such chunk - send time;
output tokens = server `usage.completion_tokens`, else the re-tokenised text.
Aggregates over successful requests: TPOT_r = (E2EL_r - TTFT_r) / (out_r - 1) for out_r > 1;
mean / median / std / percentiles (numpy, linear) in ms; ITL percentiles over the pooled gaps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_NAMES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


@dataclass
class RequestFuncOutput:
    """What one benchmark request measured (field names as vLLM's)."""

    generated_text: str = ""
    success: bool = False
    latency: float = 0.0  # E2EL, seconds
    output_tokens: int = 0  # from the server's usage; 0 = unknown
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_len: int = 0
    error: str = ""
    start_time: float = 0.0  # perf_counter at send (for the concurrency timeline)


@dataclass
class BenchmarkMetrics:
    completed: int
    total_input: int
    total_output: int
    request_throughput: float
    request_goodput: float
    output_throughput: float
    total_token_throughput: float
    stats: dict[str, float]  # "{mean,median,std,pNN}_{metric}_ms" -> value
    output_lens: list[int]
    max_output_tokens_per_s: float
    max_concurrent_requests: int


def _pct_key(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def calculate_metrics(input_lens: list[int], outputs: list[RequestFuncOutput], dur_s: float,
                      count_tokens: Callable[[str], int] | None, selected_metrics: list[str],
                      selected_percentiles: list[float], goodput: dict[str, float] | None = None) -> BenchmarkMetrics:
    """`input_lens[i]` is request i's prompt length (dataset tokens); `count_tokens(text)` re-counts
    output tokens when the server sent no usage; `goodput` maps metric -> SLO in ms."""
    out_lens: list[int] = []
    total_input = completed = good = 0
    ttfts, tpots, itls, e2els, all_tpots = [], [], [], [], []
    for n_in, o in zip(input_lens, outputs):
        if not o.success:
            out_lens.append(0)
            continue
        n_out = o.output_tokens or (count_tokens(o.generated_text) if count_tokens else 0)
        out_lens.append(n_out)
        total_input += n_in
        tpot = 0.0  # goodput counts a one-token request as TPOT 0 (vLLM)
        if n_out > 1:
            tpot = (o.latency - o.ttft) / (n_out - 1)
            tpots.append(tpot)
        all_tpots.append(tpot)
        itls += o.itl
        ttfts.append(o.ttft)
        e2els.append(o.latency)
        completed += 1
        if goodput:
            vals = {"ttft": o.ttft, "tpot": tpot, "e2el": o.latency}
            good += all(vals[k] * 1000 <= slo for k, slo in goodput.items())
    samples = {"ttft": ttfts, "tpot": tpots, "itl": itls, "e2el": e2els}
    stats: dict[str, float] = {}
    for m in selected_metrics:
        xs = np.asarray(samples[m] or [0.0], dtype=np.float64) * 1000.0
        stats[f"mean_{m}_ms"] = float(np.mean(xs))
        stats[f"median_{m}_ms"] = float(np.median(xs))
        stats[f"std_{m}_ms"] = float(np.std(xs))
        for p in selected_percentiles:
            stats[f"p{_pct_key(p)}_{m}_ms"] = float(np.percentile(xs, p))
    peak_tps, peak_conc = _peaks(outputs, dur_s)
    total_output = sum(out_lens)
    return BenchmarkMetrics(
        completed=completed, total_input=total_input, total_output=total_output,
        request_throughput=completed / dur_s, request_goodput=(good / dur_s) if goodput else 0.0,
        output_throughput=total_output / dur_s, total_token_throughput=(total_input + total_output) / dur_s,
        stats=stats, output_lens=out_lens, max_output_tokens_per_s=peak_tps, max_concurrent_requests=peak_conc)


def _peaks(outputs: list[RequestFuncOutput], dur_s: float) -> tuple[float, int]:
    """Peak output tokens per 1 s bucket and peak in-flight requests (vLLM's extra summary lines).
    Token times are the chunk arrival times (first chunk = TTFT, then the ITL gaps)."""
    ok = [o for o in outputs if o.success]
    if not ok:
        return 0.0, 0
    t0 = min(o.start_time for o in ok)
    buckets = np.zeros(int(np.ceil(dur_s)) + 2)
    events = []
    for o in ok:
        t = o.start_time - t0 + o.ttft
        buckets[min(int(t), len(buckets) - 1)] += 1
        for gap in o.itl:
            t += gap
            buckets[min(int(t), len(buckets) - 1)] += 1
        events += [(o.start_time - t0, 1), (o.start_time - t0 + o.latency, -1)]
    conc = peak = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        conc += d
        peak = max(peak, conc)
    return float(buckets.max()), peak


def result_json(m: BenchmarkMetrics, outputs: list[RequestFuncOutput], input_lens: list[int], dur_s: float,
                config: dict) -> dict:
    """The saved result, with vLLM's keys (run config first, then the figures, then per-request arrays)."""
    return {
        **config,
        "duration": dur_s,
        "completed": m.completed,
        "failed": len(outputs) - m.completed,
        "total_input_tokens": m.total_input,
        "total_output_tokens": m.total_output,
        "request_throughput": m.request_throughput,
        "request_goodput": m.request_goodput if config.get("goodput") else None,
        "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
        "max_output_tokens_per_s": m.max_output_tokens_per_s,
        "max_concurrent_requests": m.max_concurrent_requests,
        **m.stats,
        "input_lens": list(input_lens),
        "output_lens": m.output_lens,
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
    }


def format_table(m: BenchmarkMetrics, dur_s: float, num_failed: int, max_concurrency: int | None,
                 request_rate: float, selected_metrics: list[str], selected_percentiles: list[float],
                 goodput: bool = False) -> str:
    """vLLM's end-of-run table."""
    rows = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]

    def row(name: str, value, fmt: str = "") -> None:
        rows.append(f"{name:<40} {value:<10{fmt}}")

    row("Successful requests:", m.completed)
    row("Failed requests:", num_failed)
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency)
    row("Request rate configured (RPS):", "inf" if request_rate == float("inf") else f"{request_rate:.2f}")
    row("Benchmark duration (s):", dur_s, ".2f")
    row("Total input tokens:", m.total_input)
    row("Total generated tokens:", m.total_output)
    row("Request throughput (req/s):", m.request_throughput, ".2f")
    if goodput:
        row("Request goodput (req/s):", m.request_goodput, ".2f")
    row("Output token throughput (tok/s):", m.output_throughput, ".2f")
    row("Peak output token throughput (tok/s):", m.max_output_tokens_per_s, ".2f")
    row("Peak concurrent requests:", m.max_concurrent_requests)
    row("Total token throughput (tok/s):", m.total_token_throughput, ".2f")
    for metric in selected_metrics:
        rows.append("{s:{c}^50}".format(s=f" {METRIC_NAMES[metric]} ", c="-"))
        row(f"Mean {metric.upper()} (ms):", m.stats[f"mean_{metric}_ms"], ".2f")
        row(f"Median {metric.upper()} (ms):", m.stats[f"median_{metric}_ms"], ".2f")
        row(f"Std {metric.upper()} (ms):", m.stats[f"std_{metric}_ms"], ".2f")
        for p in selected_percentiles:
            row(f"P{_pct_key(p)} {metric.upper()} (ms):", m.stats[f"p{_pct_key(p)}_{metric}_ms"], ".2f")
    rows.append("=" * 50)
    return "\n".join(rows)
