"""Request handlers: OpenAI request -> engine requests -> OpenAI response / SSE chunks.

One `OpenAIServing` object per server. Each prompt x `n` sample becomes its own engine request
(`SamplingParams.n == 1`; seeds are offset per sample so n seeded samples differ), and their output
streams are merged. All validation happens BEFORE a stream starts, so bad input is a 4xx JSON error;
an engine failure after the stream started is sent as an SSE `data: {"error": ...}` chunk.

Streaming text is the difference between consecutive cumulative texts, with two hold-backs so the
joined stream always equals the final (non-streamed) text: a trailing U+FFFD (an incomplete UTF-8
character) and, when stop strings are set, the last `max(len(stop)) - 1` characters (a stop string
that completes later may start there, and the engine then cuts it off).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from dsv3.errors import UserError
from dsv3.serve.async_engine import AsyncEngine, RequestStream
from dsv3.serve.metrics import ServerMetrics
from dsv3.serve.protocol import (
    APIError, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatResponseMessage,
    ChatTokenLogprob, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, DetokenizeRequest,
    ModelCard, ModelList, TokenizeRequest, TopLogprob, Usage, random_id,
)


@dataclass
class _Prompt:
    text: str | None  # the prompt string (None for token-id prompts; decoded lazily for echo)
    ids: list[int]


class _TextState:
    """Per-choice streaming state: what text / tokens have already been sent."""

    def __init__(self, holdback: int):
        self.holdback = holdback
        self.sent_text = ""
        self.sent_tokens = 0
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


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str, metrics: ServerMetrics, model_root: str | None = None):
        self.engine = engine
        self.tok = engine.tokenizer
        self.model_name = model_name
        self.model_root = model_root
        self.metrics = metrics
        self.max_model_len = engine.max_model_len
        cfg = getattr(engine.engine, "model_config", None)
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or self.tok.vocab_size)

    # ------------------------------------------------------------------ small endpoints
    def models(self) -> dict:
        card = ModelCard(id=self.model_name, root=self.model_root, max_model_len=self.max_model_len)
        return ModelList(data=[card]).model_dump()

    def tokenize(self, req: TokenizeRequest) -> dict:
        if (req.prompt is None) == (req.messages is None):
            raise APIError("give exactly one of 'prompt' or 'messages'", param="prompt")
        if req.messages is not None:
            ids = self._chat_ids([m.model_dump(exclude_none=True) for m in req.messages], req.add_generation_prompt)
        else:
            ids = self.tok.encode(req.prompt, add_bos=req.add_special_tokens and self.tok.add_bos_token)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [self.tok.id_to_token(i) for i in ids]
        return out

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self._check_ids(req.tokens, "tokens")
        return {"prompt": self.tok.decode(req.tokens, skip_special_tokens=False)}

    def tokenizer_info(self) -> dict:
        cfg = getattr(self.tok, "config", {}) or {}
        info = {
            "tokenizer_class": cfg.get("tokenizer_class", "LlamaTokenizerFast"),
            "bos_token": self.tok.bos_token, "eos_token": self.tok.eos_token,
            "bos_token_id": self.tok.bos_id, "eos_token_id": self.tok.eos_id,
            "pad_token": self.tok.id_to_token(self.tok.pad_id),
            "add_bos_token": bool(self.tok.add_bos_token), "add_eos_token": False,
            "model_max_length": self.max_model_len, "vocab_size": self.tok.vocab_size,
        }
        if isinstance(cfg.get("chat_template"), str):
            info["chat_template"] = cfg["chat_template"]
        return info

    # ------------------------------------------------------------------ validation helpers
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(f"The model `{name}` does not exist.", 404, "model")

    def _check_ids(self, ids: list, param: str) -> None:
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise APIError(f"{param}: token id {t!r} is out of range [0, {self.vocab_size})", param=param)

    def _chat_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        if not messages:
            raise APIError("'messages' must not be empty", param="messages")
        try:
            return list(self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True))
        except UserError as e:
            raise APIError(str(e), param="messages") from None

    def _completion_prompts(self, prompt: Any) -> list[_Prompt]:
        """str | list[str] | list[int] | list[list[int]] -> prompts (strings get BOS, as V3 does)."""
        bad = APIError("'prompt' must be a string, a list of strings, a list of token ids, "
                       "or a list of token-id lists", param="prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise bad
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append(_Prompt(p, self.tok.encode(p, add_bos=self.tok.add_bos_token)))
            elif isinstance(p, list) and p:
                self._check_ids(p, "prompt")
                out.append(_Prompt(None, list(p)))
            else:
                raise bad
        return out

    def _params(self, req, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                prompt_logprobs: int | None, seed_offset: int):
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
                                  logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "stop_token_ids"):
            if getattr(req, name) is not None:
                kw[name] = getattr(req, name)
        if req.seed is not None:
            kw["seed"] = req.seed + seed_offset
        try:
            params = SamplingParams(**kw)
            params.validate()
        except (ValueError, TypeError) as e:
            raise APIError(str(e)) from None
        return params

    def _check_common(self, req) -> None:
        self.check_model(req.model)
        if req.n < 1:
            raise APIError("n must be at least 1", param="n")
        if req.max_tokens is not None and req.max_tokens < 1 and not getattr(req, "echo", False):
            raise APIError("max_tokens must be at least 1", param="max_tokens")

    # ------------------------------------------------------------------ engine fan-out
    async def _start(self, prompts: list[_Prompt], make_params) -> list[tuple[int, _Prompt, RequestStream]]:
        """Add every (prompt, sample) request; on any failure abort the ones already added."""
        base = random_id("req")
        started: list[tuple[int, _Prompt, RequestStream]] = []
        try:
            for i, p in enumerate(prompts):
                for j, params in enumerate(make_params(p)):
                    index = len(started)
                    s = await self.engine.add_request(f"{base}-{index}", p.text, p.ids, params)
                    started.append((index, p, s))
        except BaseException as e:
            for _, _, s in started:
                s.close()
            if isinstance(e, ValueError):
                raise APIError(str(e)) from None
            raise
        return started

    async def _tracked(self, prompt: _Prompt, stream: RequestStream, t0: float) -> AsyncIterator[Any]:
        """One engine request's outputs; its TTFT / latency / tokens go to the metrics when it ends."""
        ttft, last = None, None
        try:
            async for out in stream:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                last = out
                yield out
        finally:
            stream.close()
            co = last.outputs[0] if last is not None and last.outputs else None
            self.metrics.request_done(len(prompt.ids), len(co.token_ids) if co else 0,
                                      co.finish_reason if co and last.finished else None,
                                      ttft, time.perf_counter() - t0)

    async def _merged(self, started) -> AsyncIterator[tuple[int, Any]]:
        """Interleave the outputs of several engine requests as they come (one request: no extra task)."""
        t0 = time.perf_counter()
        if len(started) == 1:
            index, prompt, stream = started[0]
            async for out in self._tracked(prompt, stream, t0):
                yield index, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, prompt: _Prompt, stream: RequestStream) -> None:
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

    # ------------------------------------------------------------------ logprobs formatting
    def _token_str(self, token_id: int, lp=None) -> str:
        s = getattr(lp, "decoded_token", None) if lp is not None else None
        return s if s is not None else self.tok.decode([token_id], skip_special_tokens=False)

    def _completion_logprobs(self, ids: list[int], entries: list, text_offset0: int, k: int) -> CompletionLogprobs:
        """Legacy completions logprobs for `ids`; `entries[i]` is None or {token_id: Logprob}."""
        out = CompletionLogprobs()
        offset = text_offset0
        for tid, entry in zip(ids, entries):
            tok = self._token_str(tid, entry.get(tid) if entry else None)
            out.tokens.append(tok)
            out.text_offset.append(offset)
            offset += len(tok)
            if not entry:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_finite(entry[tid].logprob) if tid in entry else None)
            top = sorted(entry.items(), key=lambda kv: _rank(kv[1]))
            # the sampled token plus the k best (vLLM's shape: up to k + 1 entries)
            chosen = [(t, lp) for t, lp in top if t == tid or _rank(lp) <= k]
            out.top_logprobs.append({self._token_str(t, lp): _finite(lp.logprob) for t, lp in chosen})
        return out

    def _chat_logprobs(self, ids: list[int], entries: list, k: int) -> ChatLogprobs:
        content = []
        for tid, entry in zip(ids, entries):
            entry = entry or {}
            tok = self._token_str(tid, entry.get(tid))
            top = sorted(entry.items(), key=lambda kv: _rank(kv[1]))[:k] if k else []
            content.append(ChatTokenLogprob(
                token=tok, logprob=_finite(entry[tid].logprob) if tid in entry else -9999.0,
                bytes=list(tok.encode("utf-8")),
                top_logprobs=[TopLogprob(token=(s := self._token_str(t, lp)), logprob=_finite(lp.logprob),
                                         bytes=list(s.encode("utf-8"))) for t, lp in top]))
        return ChatLogprobs(content=content)

    # ------------------------------------------------------------------ /v1/completions
    async def completions(self, req: CompletionRequest):
        """-> a response dict (non-streaming) or an async iterator of SSE strings."""
        self._check_common(req)
        if req.suffix:
            raise APIError("'suffix' is not supported", param="suffix")
        if req.logprobs is not None and req.logprobs < 0:
            raise APIError("logprobs must be non-negative", param="logprobs")
        prompts = self._completion_prompts(req.prompt)
        k = req.logprobs
        want_prompt_lp = req.echo and k is not None

        def make_params(p: _Prompt):
            return [self._params(req, len(p.ids), req.max_tokens, k, k if want_prompt_lp else None, j)
                    for j in range(req.n)]

        for p in prompts:  # validate everything before the first request is added
            make_params(p)
        started = await self._start(prompts, make_params)
        request_id = random_id("cmpl")
        prompt_tokens = sum(len(p.ids) for p in prompts)
        if req.stream:
            return self._completion_stream(req, request_id, started, prompt_tokens)
        return await self._completion_full(req, request_id, started, prompt_tokens)

    def _prompt_text(self, p: _Prompt) -> str:
        return p.text if p.text is not None else self.tok.decode(p.ids, skip_special_tokens=False)

    def _echo_logprobs(self, p: _Prompt, out, k: int) -> CompletionLogprobs:
        entries = list(out.prompt_logprobs or [None] * len(p.ids))
        return self._completion_logprobs(p.ids, entries, 0, k)

    async def _completion_full(self, req, request_id, started, prompt_tokens) -> dict:
        final: dict[int, Any] = {}
        async for index, out in self._merged(started):
            final[index] = out
        choices, completion_tokens = [], 0
        for index, p, _ in started:
            out = final[index]
            co = out.outputs[0]
            completion_tokens += len(co.token_ids)
            text, lps = co.text, None
            prefix = ""
            if req.echo:
                prefix = self._prompt_text(p)
                text = prefix + text
            if req.logprobs is not None:
                gen = self._completion_logprobs(list(co.token_ids), list(co.logprobs or []), 0, req.logprobs)
                if req.echo:
                    lps = self._echo_logprobs(p, out, req.logprobs)
                    base = sum(len(t) for t in lps.tokens)
                    gen.text_offset = [o + base for o in gen.text_offset]
                    for f in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
                        getattr(lps, f).extend(getattr(gen, f))
                else:
                    lps = gen
            choices.append(CompletionChoice(index=index, text=text, logprobs=lps, finish_reason=co.finish_reason,
                                            stop_reason=co.stop_reason))
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)
        resp = CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)
        return resp.model_dump()

    async def _completion_stream(self, req, request_id, started, prompt_tokens) -> AsyncIterator[str]:
        out_chunks = _Chunks("text_completion", request_id, self.model_name, prompt_tokens, req)
        states = {index: _TextState(_holdback(req.stop)) for index, _, _ in started}
        prompts = {index: p for index, p, _ in started}

        try:
            async for index, out in self._merged(started):
                st, co = states[index], out.outputs[0]
                piece = st.delta(co.text, out.finished)
                new_ids = list(co.token_ids[st.sent_tokens:])
                lps = None
                if req.logprobs is not None:
                    lps = self._completion_logprobs(new_ids, list((co.logprobs or [])[st.sent_tokens:]), 0,
                                                    req.logprobs)
                if not st.started and req.echo:
                    p = prompts[index]
                    piece = self._prompt_text(p) + piece
                    if req.logprobs is not None:
                        echo = self._echo_logprobs(p, out, req.logprobs)
                        for f in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
                            getattr(echo, f).extend(getattr(lps, f))
                        lps = echo
                st.started = True
                st.sent_tokens = len(co.token_ids)
                out_chunks.done[index] = len(co.token_ids)
                if not piece and not out.finished and not new_ids:
                    continue
                yield out_chunks.sse([{
                    "index": index, "text": piece, "logprobs": lps.model_dump() if lps is not None else None,
                    "finish_reason": co.finish_reason if out.finished else None,
                    "stop_reason": co.stop_reason if out.finished else None}])
            if out_chunks.include_usage:
                yield out_chunks.sse([], final=True)
        except Exception as e:  # the stream has started: report in-band, never crash the server
            yield _sse(_error_body(e))
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ /v1/chat/completions
    async def chat(self, req: ChatCompletionRequest):
        self._check_common(req)
        if req.max_completion_tokens is not None and req.max_completion_tokens < 1:
            raise APIError("max_completion_tokens must be at least 1", param="max_completion_tokens")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise APIError("top_logprobs must be between 0 and 20", param="top_logprobs")
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        ids = self._chat_ids(messages, req.add_generation_prompt)
        prompt = _Prompt(None, ids)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        k = (req.top_logprobs or 0) if req.logprobs else None

        def make_params(p: _Prompt):
            return [self._params(req, len(p.ids), max_tokens, k, None, j) for j in range(req.n)]

        make_params(prompt)
        started = await self._start([prompt], make_params)
        request_id = random_id("chatcmpl")
        if req.stream:
            return self._chat_stream(req, request_id, started, len(ids), k)
        final: dict[int, Any] = {}
        async for index, out in self._merged(started):
            final[index] = out
        choices, completion_tokens = [], 0
        for index, _, _ in started:
            co = final[index].outputs[0]
            completion_tokens += len(co.token_ids)
            lps = self._chat_logprobs(list(co.token_ids), list(co.logprobs or []), k) if k is not None else None
            choices.append(ChatChoice(index=index, message=ChatResponseMessage(content=co.text), logprobs=lps,
                                      finish_reason=co.finish_reason, stop_reason=co.stop_reason))
        usage = Usage(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                      total_tokens=len(ids) + completion_tokens)
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage).model_dump()

    async def _chat_stream(self, req, request_id, started, prompt_tokens: int, k: int | None) -> AsyncIterator[str]:
        out_chunks = _Chunks("chat.completion.chunk", request_id, self.model_name, prompt_tokens, req)
        states = {index: _TextState(_holdback(req.stop)) for index, _, _ in started}

        try:
            async for index, out in self._merged(started):
                st, co = states[index], out.outputs[0]
                if not st.started:  # vLLM sends the role chunk with the first engine output
                    st.started = True
                    yield out_chunks.sse([{"index": index, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}])
                piece = st.delta(co.text, out.finished)
                new_ids = list(co.token_ids[st.sent_tokens:])
                lps = None
                if k is not None and new_ids:
                    lps = self._chat_logprobs(new_ids, list((co.logprobs or [])[st.sent_tokens:]), k)
                st.sent_tokens = len(co.token_ids)
                out_chunks.done[index] = len(co.token_ids)
                if not piece and not out.finished:
                    continue
                yield out_chunks.sse([{
                    "index": index, "delta": {"content": piece} if piece else {},
                    "logprobs": lps.model_dump() if lps is not None else None,
                    "finish_reason": co.finish_reason if out.finished else None}])
            if out_chunks.include_usage:
                yield out_chunks.sse([], final=True)
        except Exception as e:
            yield _sse(_error_body(e))
        yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------- helpers
class _Chunks:
    """SSE chunks of one streamed response: shared id / created / model, and the usage so far
    (`done[index]` = tokens of choice `index`) for `include_usage` / `continuous_usage_stats`.
    Chunks are plain dicts (one per token per request: no pydantic on the hot path)."""

    def __init__(self, obj: str, request_id: str, model: str, prompt_tokens: int, req):
        self.head = {"id": request_id, "object": obj, "created": int(time.time()), "model": model}
        self.prompt_tokens = prompt_tokens
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
        return _sse(chunk)


def _holdback(stop) -> int:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return max((len(s) for s in stops), default=1) - 1


def _rank(lp) -> int:
    r = getattr(lp, "rank", None)
    return r if r is not None else 1 << 30


def _finite(x: float) -> float:
    """JSON has no -inf; clamp like vLLM does (-9999.0)."""
    x = float(x)
    return max(x, -9999.0) if x == x else -9999.0


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def _error_body(e: BaseException) -> dict:
    if isinstance(e, APIError):
        return e.body()
    return APIError(f"{type(e).__name__}: {e}", 500).body()
