"""/v1/chat/completions: messages -> the chat template -> one engine request per sample."""

from __future__ import annotations

from typing import Any, AsyncIterator

from dsv3.serve.handlers.base import OpenAIServing, Prompt
from dsv3.serve.handlers.chat_output import ChatChoiceParser
from dsv3.serve.handlers.streaming import Chunks, TextState, cached_tokens, error_body, finite, holdback, rank, sse
from dsv3.serve.protocol import (
    APIError, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatResponseMessage,
    ChatTokenLogprob, TopLogprob, Usage, random_id,
)
from dsv3.serve.reasoning import for_request, get_reasoning_parser
from dsv3.serve.tools import CALL_FORMATS, ToolError, plan_tools, with_tool_prompt

TEMPLATE_KWARGS = {"thinking": bool}
"""chat_template_kwargs the chat formats read (V3.1: `thinking`); any other key is refused, not ignored."""


class OpenAIServingChat(OpenAIServing):
    def __init__(self, *args, reasoning_parser: str | None = None, tool_call_parser: str | None = None, **kw):
        super().__init__(*args, **kw)
        self.reasoning_parser = get_reasoning_parser(reasoning_parser)
        # the checkpoint's chat format: V3.1's and V3.2's render tools and thinking themselves and call
        # tools their own way
        chat_format = getattr(self.tok, "chat_format", None)
        self.v31 = chat_format in ("deepseek_v31", "deepseek_v32")
        self.call_format = CALL_FORMATS[tool_call_parser or (chat_format if self.v31 else "deepseek_v3")]

    def _template_kwargs(self, req: ChatCompletionRequest) -> dict:
        kw = dict(req.chat_template_kwargs or {})
        for key, value in kw.items():
            if key not in TEMPLATE_KWARGS:
                raise APIError(f"chat_template_kwargs: {key!r} is not read by this model's chat template "
                               f"(known: {', '.join(TEMPLATE_KWARGS)})", param="chat_template_kwargs")
            if not isinstance(value, TEMPLATE_KWARGS[key]):
                raise APIError(f"chat_template_kwargs.{key} must be a boolean", param="chat_template_kwargs")
        if kw.get("thinking") and not self.v31:
            raise APIError("chat_template_kwargs.thinking: this model's chat template (DeepSeek-V3) has no thinking "
                           "mode (DeepSeek-V3.1 and V3.2 checkpoints do)", param="chat_template_kwargs")
        return kw

    async def chat(self, req: ChatCompletionRequest):
        self._check_common(req)
        if req.max_completion_tokens is not None and req.max_completion_tokens < 1:
            raise APIError("max_completion_tokens must be at least 1", param="max_completion_tokens")
        try:
            plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        except ToolError as e:
            raise APIError(str(e), param=e.param) from None
        template_kw = self._template_kwargs(req)
        guided = await self.guided(req, plan.guided_json())
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        if self.v31:  # V3.1's template (V3.2's encoding) describes the tools itself
            template_kw["tools"] = plan.tools if plan.describe else None
        else:
            messages = with_tool_prompt(messages, plan)
        ids = await self.chat_ids(messages, req.add_generation_prompt, **template_kw)
        prompt = Prompt(None, ids)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        k = (req.top_logprobs or 0) if req.logprobs else None

        def make_params(p: Prompt):
            return [self._params(req, len(p.ids), max_tokens, k, None, j, guided) for j in range(req.n)]

        started = await self._start([prompt], make_params, req.cache_salt)
        request_id = random_id("chatcmpl")
        # a grammar constrains the output from its first token: tool arguments have no reasoning part, and
        # other constrained output has one only if it opens with <think> itself (docs/serving.md)
        reasoning = for_request(self.reasoning_parser, bool(template_kw.get("thinking")))
        if reasoning is not None and guided is not None:
            reasoning = None if plan.guided_json() is not None else reasoning.constrained()
        parsers = {index: ChatChoiceParser(reasoning, plan, self.call_format) for index, _, _ in started}
        if req.stream:
            return self._chat_stream(req, request_id, started, len(ids), k, parsers)
        return await self._chat_full(req, request_id, started, len(ids), k, parsers)

    async def _chat_full(self, req, request_id, started, prompt_tokens: int, k: int | None, parsers) -> dict:
        final: dict[int, Any] = {}
        version = None  # of the newest output: an update in between had the others' tokens recomputed
        async for index, out in self._merged(started):
            final[index] = out
            version = out.weight_version
        choices, completion_tokens = [], 0
        for index, _, _ in started:
            co = final[index].outputs[0]
            completion_tokens += len(co.token_ids)
            lps = self._chat_logprobs(list(co.token_ids), list(co.logprobs or []), k) if k is not None else None
            parser = parsers[index]
            message = ChatResponseMessage(**parser.full(co.text))
            choices.append(ChatChoice(index=index, message=message, logprobs=lps, routed_experts=co.routed_experts,
                                      finish_reason=parser.finish_reason(co.finish_reason), stop_reason=co.stop_reason))
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens,
                      prompt_tokens_details=cached_tokens(final[started[0][0]]))
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage,
                                      weight_version=version).model_dump()

    async def _chat_stream(self, req, request_id, started, prompt_tokens: int, k: int | None,
                           parsers) -> AsyncIterator[str]:
        out_chunks = Chunks("chat.completion.chunk", request_id, self.model_name, prompt_tokens, req)
        states = {index: TextState(holdback(req.stop)) for index, _, _ in started}

        try:
            async for index, out in self._merged(started):
                st, co = states[index], out.outputs[0]
                out_chunks.weight_version = out.weight_version
                if not st.started:  # vLLM sends the role chunk with the first engine output
                    st.started = True
                    yield out_chunks.sse([{"index": index, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}])
                if index == started[0][0]:
                    out_chunks.details = cached_tokens(out)
                st.delta(co.text, out.finished)
                delta = parsers[index].delta(st.sent_text, out.finished)
                new_ids = list(co.token_ids[st.sent_tokens:])
                lps = None
                if k is not None and new_ids:
                    lps = self._chat_logprobs(new_ids, list((co.logprobs or [])[st.sent_tokens:]), k)
                out_chunks.done[index] = len(co.token_ids)
                if not delta and not out.finished:
                    continue  # their logprobs go out with the next chunk that has text
                st.sent_tokens = len(co.token_ids)
                yield out_chunks.sse([st.routes({
                    "index": index, "delta": delta,
                    "logprobs": lps.model_dump() if lps is not None else None,
                    "finish_reason": parsers[index].finish_reason(co.finish_reason) if out.finished else None}, co)])
            if out_chunks.include_usage:
                yield out_chunks.sse([], final=True)
        except Exception as e:
            yield sse(error_body(e))
        yield "data: [DONE]\n\n"

    def _chat_logprobs(self, ids: list[int], entries: list, k: int) -> ChatLogprobs:
        content = []
        for tid, entry in zip(ids, entries):
            entry = entry or {}
            tok = self._token_str(tid, entry.get(tid))
            top = sorted(entry.items(), key=lambda kv: rank(kv[1]))[:k] if k else []
            content.append(ChatTokenLogprob(
                token=tok, logprob=finite(entry[tid].logprob) if tid in entry else -9999.0,
                bytes=list(tok.encode("utf-8")),
                top_logprobs=[TopLogprob(token=(s := self._token_str(t, lp)), logprob=finite(lp.logprob),
                                         bytes=list(s.encode("utf-8"))) for t, lp in top]))
        return ChatLogprobs(content=content)
