"""Streaming helpers shared by the completions and chat handlers.

Streaming text is the difference between consecutive cumulative texts, with two hold-backs so the
joined stream always equals the final (non-streamed) text: a trailing U+FFFD (an incomplete UTF-8
character) and, when stop strings are set, the last `max(len(stop)) - 1` characters (a stop string
that completes later may start there, and the engine then cuts it off).
"""

from __future__ import annotations

import json
import time
from typing import Any

from dsv3.serve.protocol import APIError


class TextState:
    """Per-choice streaming state: what text / tokens have already been sent."""

    def __init__(self, holdback: int):
        self.holdback = holdback
        self.sent_text = ""
        self.sent_tokens = 0
        self.sent_routes = 0
        self.started = False

    def delta(self, text: str, finished: bool) -> str:
        end = len(text)
        if not finished:
            end -= self.holdback
            while end > 0 and text[end - 1] == "\ufffd":
                end -= 1
        if end <= len(self.sent_text) or not text.startswith(self.sent_text):
            return ""
        piece = text[len(self.sent_text):end]
        self.sent_text += piece
        return piece

    def routes(self, choice: dict, co) -> dict:
        """`choice` with the routed experts of the tokens not sent yet (return_routed_experts), marked sent."""
        if co.routed_experts is None:
            return choice
        choice["routed_experts"] = co.routed_experts[self.sent_routes:]
        self.sent_routes = len(co.routed_experts)
        return choice


class Chunks:
    """SSE chunks of one streamed response: shared id / created / model, and the usage so far
    (`done[index]` = tokens of choice `index`) for `include_usage` / `continuous_usage_stats`.
    Chunks are plain dicts (one per token per request: no pydantic on the hot path)."""

    def __init__(self, obj: str, request_id: str, model: str, prompt_tokens: int, req):
        self.head = {"id": request_id, "object": obj, "created": int(time.time()), "model": model}
        self.prompt_tokens = prompt_tokens
        self.details: dict | None = None  # usage.prompt_tokens_details (cached_tokens), when known
        self.done: dict[int, int] = {}
        opts = req.stream_options
        self.include_usage = bool(opts and opts.include_usage)
        self.continuous = self.include_usage and bool(opts.continuous_usage_stats)

    def sse(self, choices: list[dict], final: bool = False) -> str:
        chunk: dict[str, Any] = {**self.head, "choices": choices}
        if final or self.continuous:
            n = sum(self.done.values())
            chunk["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": n,
                              "total_tokens": self.prompt_tokens + n}
            if self.details is not None:
                chunk["usage"]["prompt_tokens_details"] = self.details
        return sse(chunk)


def cached_tokens(out) -> dict:
    """usage.prompt_tokens_details from an engine output: the prompt tokens served from the prefix
    cache (`RequestOutput.num_cached_tokens`)."""
    return {"cached_tokens": int(out.num_cached_tokens)}


def holdback(stop) -> int:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return max((len(s) for s in stops), default=1) - 1


def rank(lp) -> int:
    r = getattr(lp, "rank", None)
    return r if r is not None else 1 << 30


def finite(x: float) -> float:
    """JSON has no -inf; clamp like vLLM does (-9999.0)."""
    x = float(x)
    return max(x, -9999.0) if x == x else -9999.0


def sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def error_body(e: BaseException) -> dict:
    return APIError.of(e).body()
