"""/v1/completions: legacy completions (prompt strings or token ids, echo, legacy logprobs)."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from dsv3.serve.handlers.base import OpenAIServing, Prompt
from dsv3.serve.handlers.streaming import Chunks, TextState, cached_tokens, error_body, finite, holdback, rank, sse
from dsv3.serve.protocol import (
    APIError, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage, random_id,
)
from dsv3.serve.caps import check_fanout


class OpenAIServingCompletion(OpenAIServing):
    async def completions(self, req: CompletionRequest):
        """-> a response dict (non-streaming) or an async iterator of SSE strings."""
        self._check_common(req)
        if req.suffix:
            raise APIError("'suffix' is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError("'best_of' other than n is not supported (each of the n samples is returned)",
                           param="best_of")
        prompts = await self._completion_prompts(req.prompt, req.n)
        k = req.logprobs
        want_prompt_lp = req.echo and k is not None

        guided = await self.guided(req)

        def make_params(p: Prompt):
            return [self._params(req, len(p.ids), req.max_tokens, k, k if want_prompt_lp else None, j, guided)
                    for j in range(req.n)]

        started = await self._start(prompts, make_params, req.cache_salt)
        request_id = random_id("cmpl")
        prompt_tokens = sum(len(p.ids) for p in prompts)
        if req.stream:
            return self._completion_stream(req, request_id, started, prompt_tokens)
        return await self._completion_full(req, request_id, started, prompt_tokens)

    async def _completion_prompts(self, prompt: Any, n: int) -> list[Prompt]:
        """str | list[str] | list[int] | list[list[int]] -> prompts (strings get BOS, as V3 does); each
        is checked (off the event loop: up to a million token ids) before any is tokenised."""
        bad = APIError("'prompt' must be a string, a list of strings, a list of token ids, "
                       "or a list of token-id lists", param="prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise bad
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            prompt = [prompt]
        if len(prompt) > self.limits.max_prompts:
            raise APIError(f"{len(prompt)} prompts in one request; at most {self.limits.max_prompts} "
                           f"(the server's --max-prompts)", param="prompt")
        check_fanout(n, len(prompt), self.limits)
        await asyncio.to_thread(self._check_prompts, prompt, bad)
        return [Prompt(p, await self.encode(p, self.tok.add_bos_token)) if isinstance(p, str) else Prompt(None, list(p))
                for p in prompt]

    def _check_prompts(self, prompt: list, bad: APIError) -> None:
        for p in prompt:
            if isinstance(p, str):
                self._check_chars(len(p), "prompt")
            elif isinstance(p, list) and p:
                self._check_ids(p, "prompt")
            else:
                raise bad

    def _prompt_text(self, p: Prompt) -> str:
        return p.text if p.text is not None else self.tok.decode(p.ids, skip_special_tokens=False)

    def _echo_logprobs(self, p: Prompt, out, k: int) -> CompletionLogprobs:
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
                                            stop_reason=co.stop_reason, routed_experts=co.routed_experts))
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens,
                      prompt_tokens_details=_prompt_cache(final, req.n))
        resp = CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)
        return resp.model_dump()

    async def _completion_stream(self, req, request_id, started, prompt_tokens) -> AsyncIterator[str]:
        out_chunks = Chunks("text_completion", request_id, self.model_name, prompt_tokens, req)
        states = {index: TextState(holdback(req.stop)) for index, _, _ in started}
        prompts = {index: p for index, p, _ in started}
        last: dict[int, Any] = {}

        try:
            async for index, out in self._merged(started):
                st, co = states[index], out.outputs[0]
                last[index] = out
                out_chunks.details = _prompt_cache(last, req.n)
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
                yield out_chunks.sse([st.routes({
                    "index": index, "text": piece, "logprobs": lps.model_dump() if lps is not None else None,
                    "finish_reason": co.finish_reason if out.finished else None,
                    "stop_reason": co.stop_reason if out.finished else None}, co)])
            if out_chunks.include_usage:
                yield out_chunks.sse([], final=True)
        except Exception as e:  # the stream has started: report in-band, never crash the server
            yield sse(error_body(e))
        yield "data: [DONE]\n\n"

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
            out.token_logprobs.append(finite(entry[tid].logprob) if tid in entry else None)
            top = sorted(entry.items(), key=lambda kv: rank(kv[1]))
            # the sampled token plus the k best (vLLM's shape: up to k + 1 entries)
            chosen = [(t, lp) for t, lp in top if t == tid or rank(lp) <= k]
            out.top_logprobs.append({self._token_str(t, lp): finite(lp.logprob) for t, lp in chosen})
        return out


def _prompt_cache(outs: dict[int, Any], n: int) -> dict | None:
    """prompt_tokens_details over the prompts (sample 0 of each; prompts are counted once in usage)."""
    found = [cached_tokens(o)["cached_tokens"] for i, o in outs.items() if i % n == 0]
    return {"cached_tokens": sum(found)} if found else None
