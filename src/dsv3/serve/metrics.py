"""Prometheus text exposition (format 0.0.4) for `GET /metrics`, without a client library.

Names follow vLLM's (`vllm:time_to_first_token_seconds` -> `dsv3:time_to_first_token_seconds`), so
existing Grafana panels need only the prefix changed. The engine-wide prefix-cache and speculative
decoding counters keep vLLM's exact names (`vllm:prefix_cache_queries_total`, ...): dashboards
compute hit and acceptance rates from them. Counters and histograms are updated from the event
loop; cache gauges and engine counters come from the engine thread's latest snapshot.
"""

from __future__ import annotations

import bisect
import threading
from typing import Iterable

PREFIX = "dsv3:"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ACCEPT_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
# engine.stats() key -> (vLLM metric name, help); counters, exposed with vLLM's names so vLLM dashboards work
ENGINE_COUNTERS = (
    ("prefix_cache_queries", "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    ("spec_num_draft_tokens", "vllm:spec_decode_num_draft_tokens", "MTP draft tokens proposed."),
    ("spec_num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens", "MTP draft tokens accepted."),
)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)


RANK_GAUGES = (("forward_calls", "gauge", "Forward calls each rank has run."),
               ("requests", "gauge", "Requests each rank holds KV cache for."),
               ("weight_bytes", "gauge", "Model weight bytes resident on each rank."),
               ("cache_bytes", "gauge", "KV-cache bytes allocated on each rank."))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, esc)) + "}"


def _num(x: float) -> str:
    x = float(x)
    if x == float("inf"):
        return "+Inf"
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


class Histogram:
    def __init__(self, buckets: Iterable[float]):
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # last = +Inf overflow
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out, cum = [], 0
        for bound, c in zip(self.bounds + (float("inf"),), self.counts):
            cum += c
            out.append(f"{name}_bucket{_labels({**labels, 'le': _num(bound)})} {cum}")
        out.append(f"{name}_sum{_labels(labels)} {_num(self.sum)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class ServerMetrics:
    """All metrics of one server. Thread-safe (a lock around updates and rendering)."""

    def __init__(self, model_name: str):
        self.labels = {"model_name": model_name}
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}  # (endpoint, status) -> count
        self.finished: dict[str, int] = {}  # finish_reason -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.spec_acceptance = Histogram(ACCEPT_BUCKETS)  # per request: accepted / proposed drafts

    def http_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def request_done(self, prompt_tokens: int, output_tokens: int, finish_reason: str | None,
                     ttft_s: float | None, e2e_s: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += output_tokens
            reason = finish_reason or "abort"
            self.finished[reason] = self.finished.get(reason, 0) + 1
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
                if output_tokens > 1:
                    self.tpot.observe((e2e_s - ttft_s) / (output_tokens - 1))
            self.e2e.observe(e2e_s)

    def spec_request_done(self, drafts: int, accepted: int) -> None:
        """A finished request's speculative-decoding record (only requests that had drafts)."""
        if drafts > 0:
            with self._lock:
                self.spec_acceptance.observe(accepted / drafts)

    def render(self, running: int, cache: dict, engine_stats: dict | None = None) -> str:
        L = self.labels
        out: list[str] = []

        def head(name: str, kind: str, help_: str) -> str:
            out.append(f"# HELP {PREFIX}{name} {help_}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")
            return PREFIX + name

        with self._lock:
            n = head("num_requests_running", "gauge", "Requests in the engine (prefill or decode).")
            out.append(f"{n}{_labels(L)} {running}")
            n = head("http_requests_total", "counter", "HTTP requests by endpoint and status code.")
            for (ep, st), c in sorted(self.requests.items()):
                out.append(f"{n}{_labels({**L, 'endpoint': ep, 'status': st})} {c}")
            n = head("request_success_total", "counter", "Finished generation requests by finish reason.")
            for reason, c in sorted(self.finished.items()):
                out.append(f"{n}{_labels({**L, 'finished_reason': reason})} {c}")
            n = head("prompt_tokens_total", "counter", "Prompt tokens processed.")
            out.append(f"{n}{_labels(L)} {self.prompt_tokens}")
            n = head("generation_tokens_total", "counter", "Tokens generated.")
            out.append(f"{n}{_labels(L)} {self.generation_tokens}")
            for hist, name, help_ in ((self.ttft, "time_to_first_token_seconds", "Time to first token."),
                                      (self.tpot, "time_per_output_token_seconds", "Time per output token after the first."),
                                      (self.e2e, "e2e_request_latency_seconds", "End-to-end request latency.")):
                n = head(name, "histogram", help_)
                out.extend(hist.lines(n, L))
            if self.spec_acceptance.count:
                n = head("spec_decode_request_acceptance_rate", "histogram",
                         "Per finished request: accepted / proposed MTP draft tokens.")
                out.extend(self.spec_acceptance.lines(n, L))
        for key, name, help_ in ENGINE_COUNTERS:  # engine-wide counters (engine.stats())
            if engine_stats and key in engine_stats:
                out.append(f"# HELP {name}_total {help_}")
                out.append(f"# TYPE {name}_total counter")
                out.append(f"{name}_total{_labels(L)} {_num(engine_stats[key])}")
        ranks = (engine_stats or {}).get("ranks") or []
        for key, kind, help_ in RANK_GAUGES:  # a multi-process engine: each rank's view (as of the last heartbeat)
            if ranks:
                n = head(f"rank_{key}", kind, help_)
                out.extend(f"{n}{_labels({**L, 'rank': str(r['rank'])})} {_num(len(r[key]) if key == 'requests' else r[key])}"
                           for r in ranks)
        total, free = cache.get("num_blocks"), cache.get("free_blocks")
        if total:
            used = cache.get("used_blocks", total - (free or 0))
            n = head("kv_cache_usage_perc", "gauge", "KV-cache usage, 1 = full.")
            out.append(f"{n}{_labels(L)} {_num(used / total)}")
            n = head("kv_cache_blocks", "gauge", "KV-cache blocks by state.")
            out.append(f"{n}{_labels({**L, 'state': 'used'})} {used}")
            out.append(f"{n}{_labels({**L, 'state': 'free'})} {total - used}")
        return "\n".join(out) + "\n"
