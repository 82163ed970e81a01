"""The shared part of the OpenAI handlers: request validation, sampling parameters, and the fan-out of
one OpenAI request into engine requests whose output streams are merged.

Each prompt x `n` sample becomes its own engine request (`SamplingParams.n == 1`; seeds are offset
per sample so n seeded samples differ). All validation happens BEFORE a stream starts, so bad input
is a 4xx JSON error; an engine failure after the stream started is sent as an SSE
`data: {"error": ...}` chunk (see `streaming.py`).

One handler class per endpoint derives from `OpenAIServing` (as vLLM's `serving_*.py`):
`completions.py`, `chat.py`, `tokenize.py`, `models.py`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from dsv3.errors import UserError
from dsv3.serve.async_engine import AsyncEngine, RequestStream
from dsv3.serve.caps import check_request, check_schema
from dsv3.serve.limits import ServerLimits
from dsv3.serve.metrics import ServerMetrics
from dsv3.serve.protocol import APIError, random_id

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_CACHE_SALT_CHARS = 1024


@dataclass
class Prompt:
    text: str | None  # the prompt string (None for token-id prompts; decoded lazily for echo)
    ids: list[int]


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str, metrics: ServerMetrics,
                 limits: ServerLimits | None = None):
        self.engine = engine
        self.tok = engine.tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self.limits = limits or ServerLimits()
        self.max_model_len = engine.max_model_len
        cfg = getattr(engine.engine, "model_config", None)
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or self.tok.vocab_size)
        # A prompt of more characters than this cannot fit in max_model_len tokens (see `max_token_chars`).
        per_token = max_token_chars(self.tok)
        self.max_prompt_chars = self.max_model_len * per_token if per_token else None

    # ------------------------------------------------------------------ validation helpers
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(f"The model `{name}` does not exist.", 404, "model")

    def _check_ids(self, ids: list, param: str) -> None:
        if len(ids) > self.max_model_len:
            raise APIError(f"{param}: {len(ids)} token ids; this model's maximum context length is "
                           f"{self.max_model_len} tokens", param=param)
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise APIError(f"{param}: token id {_short(t)} is out of range [0, {self.vocab_size})", param=param)

    def _check_chars(self, n_chars: int, param: str) -> None:
        """Refuse text that cannot fit in max_model_len tokens, before spending time tokenising it."""
        if self.max_prompt_chars is not None and n_chars > self.max_prompt_chars:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens, and one token "
                           f"covers at most {self.max_prompt_chars // self.max_model_len} characters, so at most "
                           f"{self.max_prompt_chars} characters can fit. However, your {param} has {n_chars} "
                           f"characters. Please reduce the length of the {param}.", param=param)

    async def encode(self, text: str, add_bos: bool, param: str = "prompt") -> list[int]:
        """Text -> ids, off the event loop (the tokenizer releases the GIL, so /health stays responsive)."""
        self._check_chars(len(text), param)
        return await asyncio.to_thread(self.tok.encode, text, add_bos=add_bos)

    async def chat_ids(self, messages: list[dict], add_generation_prompt: bool, **template_kw) -> list[int]:
        """Messages -> the chat template's ids, off the event loop (template text only adds characters,
        so the characters of the messages bound the prompt from below). `template_kw`: what the chat
        format reads besides the messages (V3.1: thinking, tools), passed only when set."""
        if not messages:
            raise APIError("'messages' must not be empty", param="messages")
        self._check_chars(_text_chars(messages), "messages")
        try:
            kw = {k: v for k, v in template_kw.items() if v}
            return list(await asyncio.to_thread(self.tok.apply_chat_template, messages,
                                                add_generation_prompt=add_generation_prompt, tokenize=True, **kw))
        except UserError as e:
            raise APIError(str(e), param="messages") from None

    def _params(self, req, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                prompt_logprobs: int | None, seed_offset: int, guided: dict | None = None):
        from dsv3.infer.sampling import SamplingParams

        if prompt_len >= self.max_model_len:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                           f"prompt has {prompt_len} tokens. Please reduce the length of the prompt.", param="prompt")
        if max_tokens is None:
            max_tokens = self.max_model_len - prompt_len
        elif prompt_len + max_tokens > self.max_model_len:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                           f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                           f"in the completion). Please reduce the length of the prompt or completion.",
                           param="max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        kw: dict[str, Any] = dict(n=1, max_tokens=max_tokens, stop=stop or None, min_tokens=req.min_tokens,
                                  ignore_eos=req.ignore_eos, skip_special_tokens=req.skip_special_tokens,
                                  include_stop_str_in_output=req.include_stop_str_in_output,
                                  logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                  return_routed_experts=req.return_routed_experts)
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "stop_token_ids"):
            if getattr(req, name) is not None:
                kw[name] = getattr(req, name)
        if req.seed is not None:  # sample j gets seed + j, wrapped into int64 (an int64 seed stays valid)
            kw["seed"] = _wrap_int64(req.seed + seed_offset) if _INT64_MIN <= req.seed <= _INT64_MAX else req.seed
        try:
            if guided is not None:  # structured output (`dsv3.serve.structured`)
                from dsv3.serve.structured import guided_params

                kw["guided_decoding"] = guided_params(guided)
            params = SamplingParams(**kw)
            params.validate(self.vocab_size, max_logprobs=self.limits.max_logprobs)
        except (ValueError, TypeError) as e:
            raise APIError(str(e)) from None
        return params

    def _check_common(self, req) -> None:
        self.check_model(req.model)
        if not 1 <= req.n <= self.limits.max_n:
            raise APIError(f"n must be an integer in [1, {self.limits.max_n}], got {_short(req.n)}", param="n")
        if req.cache_salt is not None and not 1 <= len(req.cache_salt) <= MAX_CACHE_SALT_CHARS:
            raise APIError(f"cache_salt must be a string of 1 to {MAX_CACHE_SALT_CHARS} characters, got "
                           f"{len(req.cache_salt)}", param="cache_salt")
        if req.max_tokens is not None and req.max_tokens < 1 and not getattr(req, "echo", False):
            raise APIError("max_tokens must be at least 1", param="max_tokens")

    async def guided(self, req, tool_schema: dict | None = None) -> dict | None:
        """The request's size caps (`caps.py`: up to 128 tool schemas of 5000 values), then its output
        constraint (`structured.guided_spec`: a jsonschema check), off the event loop."""
        from dsv3.serve.structured import guided_spec

        def check() -> dict | None:
            check_request(req, self.limits)
            if tool_schema is not None:  # tool_choice required / named: the schema built from the tools
                check_schema(tool_schema, "tools", self.limits)
            return guided_spec(req, tool_schema)

        try:
            return await asyncio.to_thread(check)
        except RecursionError:  # a schema the size caps let through but jsonschema's recursion cannot walk
            raise APIError(f"the output constraint nests deeper than this server can check (at most "
                           f"{self.limits.max_json_depth} levels)") from None

    # ------------------------------------------------------------------ engine fan-out
    async def _start(self, prompts: list[Prompt], make_params,
                     cache_salt: str | None = None) -> list[tuple[int, Prompt, RequestStream]]:
        """Check every (prompt, sample) request's parameters, then add them; on any failure abort the ones
        already added. Checking compiles a grammar (llguidance, seconds for a large schema): off the loop."""
        plans = await asyncio.to_thread(lambda: [make_params(p) for p in prompts])
        routed = [s.max_tokens for samples in plans for s in samples if s.return_routed_experts]
        if routed:  # the cap holds for the whole response (every prompt and sample), not each engine request
            try:
                self.engine.engine.routes.check(sum(routed), "the choices' max_tokens summed:")
            except ValueError as e:
                raise APIError(str(e), param="return_routed_experts") from None
        base = random_id("req")
        started: list[tuple[int, Prompt, RequestStream]] = []
        try:
            for p, samples in zip(prompts, plans):
                for params in samples:
                    index = len(started)
                    s = await self.engine.add_request(f"{base}-{index}", p.text, p.ids, params, cache_salt=cache_salt)
                    started.append((index, p, s))
        except BaseException as e:
            for _, _, s in started:
                s.close()
            if isinstance(e, ValueError):
                raise APIError(str(e)) from None
            raise
        return started

    async def _tracked(self, prompt: Prompt, stream: RequestStream, t0: float) -> AsyncIterator[Any]:
        """One engine request's outputs; its TTFT / latency / tokens go to the metrics when it ends."""
        ttft, last = None, None
        try:
            async for out in stream:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                last = out
                if out.outputs and out.outputs[0].finish_reason == "error":  # this request alone failed
                    raise APIError(out.outputs[0].error or "this request failed while decoding", 400)
                yield out
        finally:
            stream.close()
            co = last.outputs[0] if last is not None and last.outputs else None
            self.metrics.request_done(len(prompt.ids), len(co.token_ids) if co else 0,
                                      co.finish_reason if co and last.finished else None,
                                      ttft, time.perf_counter() - t0)
            if last is not None and last.finished and last.metrics is not None:  # MTP drafts of this request
                self.metrics.spec_request_done(last.metrics.spec_num_draft_tokens, last.metrics.spec_num_accepted_tokens)

    async def _merged(self, started) -> AsyncIterator[tuple[int, Any]]:
        """Interleave the outputs of several engine requests as they come (one request: no extra task)."""
        t0 = time.perf_counter()
        if len(started) == 1:
            index, prompt, stream = started[0]
            async for out in self._tracked(prompt, stream, t0):
                yield index, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, prompt: Prompt, stream: RequestStream) -> None:
            try:
                async for out in self._tracked(prompt, stream, t0):
                    await queue.put((index, out, None))
                await queue.put((index, None, None))
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                await queue.put((index, None, e))

        tasks = [asyncio.create_task(pump(i, p, s)) for i, p, s in started]
        try:
            remaining = len(tasks)
            while remaining:
                index, out, err = await queue.get()
                if err is not None:
                    raise err
                if out is None:
                    remaining -= 1
                    continue
                yield index, out
        finally:
            for t in tasks:
                t.cancel()
            for _, _, s in started:
                s.close()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _token_str(self, token_id: int, lp=None) -> str:
        s = getattr(lp, "decoded_token", None) if lp is not None else None
        return s if s is not None else self.tok.decode([token_id], skip_special_tokens=False)


def max_token_chars(tok) -> int | None:
    """The most characters one token can stand for: the longest vocabulary entry. Byte-level BPE
    entries carry one character per byte, and a byte decodes to at most one character, so no
    token covers more characters than its entry is long (special tokens match their own text).
    None (no bound) for a tokenizer without a vocabulary or one that may delete characters."""
    backend = getattr(tok, "backend", None)
    if backend is None or not hasattr(backend, "get_vocab"):
        return None
    if getattr(backend, "normalizer", None) is not None and "normalizers=[]" not in repr(backend.normalizer):
        return None
    return _longest_entry(backend)


def _longest_entry(backend, _cache: dict = {}) -> int:  # noqa: B006  (one scan per tokenizer object)
    key = id(backend)
    if key not in _cache:
        _cache[key] = max(map(len, backend.get_vocab(with_added_tokens=True)), default=0) or None
    return _cache[key]


def _text_chars(obj) -> int:
    """Characters in every string inside a JSON value (iterative: depth is bounded by the parser)."""
    n, stack = 0, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            n += len(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return n


def _wrap_int64(x: int) -> int:
    return (x - _INT64_MIN) % (1 << 64) + _INT64_MIN


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."
