"""OpenAI request / response types (pydantic), the subset real clients send (`spec/clients.md`).

Requests IGNORE unknown fields (`extra="ignore"`): evalscope, guidellm and vLLM's benchmark send
vLLM extensions (`min_tokens`, `ignore_eos`, `stream_options.continuous_usage_stats`, ...), and a
422 for an unknown key would break them. The vLLM extensions we do implement are declared here.
Responses are plain pydantic models serialised with `model_dump(exclude_none=...)` by the handlers.

`parse_request` is the one way a request body becomes a request object: JSON (deeper than the
server's limit -> 400, not a RecursionError), no lone UTF-16 surrogates in any string or key
(they cannot be encoded as UTF-8, so the tokenizer and every JSON reply would fail on them), then
pydantic; every failure is an `APIError` 400 in the OpenAI shape.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI + vLLM extensions)."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None  # None -> 1.0 (OpenAI default); 0 -> greedy
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured output (`dsv3.serve.structured`): OpenAI's response_format and vLLM's guided_* extras
    response_format: dict[str, Any] | None = None
    guided_json: Any = None  # a JSON schema (object, or a JSON string)
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    cache_salt: str | None = None  # vLLM's: shares prefix-cache blocks only with requests of the same salt
    return_routed_experts: bool = False  # vLLM's: each choice's routed_experts [tokens][MoE layers][k] (dsv3.infer.routing)


class CompletionRequest(_SamplingFields):
    # str | list[str] | list[int] | list[list[int]]; checked by the handler (clear error messages)
    prompt: Any
    echo: bool = False
    logprobs: int | None = None  # legacy completions: number of top alternatives per token
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(_Request):
    role: str
    content: Any = None  # str | list of {"type": "text", "text": ...} | None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier thinking-mode reply's reasoning (V3.2 keeps it after the last user turn)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer OpenAI name of max_tokens (guidellm sends it)
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # vLLM extension
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM: {"thinking": true} for DeepSeek-V3.1


# ---------------------------------------------------------------- responses ----------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs (what lm-eval reads: token_logprobs, top_logprobs)."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    routed_experts: list[list[list[int]]] | None = None  # return_routed_experts: per generated token, per MoE layer, k ids


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # --reasoning-parser (vLLM's field)
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    routed_experts: list[list[list[int]]] | None = None  # return_routed_experts (as CompletionChoice)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "dsv3"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- vLLM tokenizer endpoints --------------------
class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- errors --------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An error answered to the client in the OpenAI shape `{"error": {...}}` with `status`."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
             413: "RequestTooLargeError", 422: "UnprocessableEntityError", 500: "InternalServerError",
             503: "ServiceUnavailableError"}

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param

    @classmethod
    def of(cls, e: BaseException) -> "APIError":
        """Any exception -> what the client sees. Errors that carry an `http_status` (the engine front's,
        `async_engine.py`) keep their message; anything else is an internal fault: a fixed message that
        names no exception class (the server log has the traceback)."""
        if isinstance(e, APIError):
            return e
        status = getattr(e, "http_status", None)
        if isinstance(status, int):
            return cls(str(e), status)
        return cls("internal server error (the server log has the details)", 500)

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.TYPES.get(self.status, "APIError"),
                         param=self.param, code=self.status)
        return ErrorResponse(error=info).model_dump()


# ---------------------------------------------------------------- parsing -------------------------------------
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_request(raw: bytes, model: type[BaseModel], max_depth: int) -> BaseModel:
    """Request body bytes -> `model`, or APIError 400 (see the module docstring)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(f"request body nests JSON deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise APIError(f"request body is not valid JSON ({_one_line(e)})") from None
    if not isinstance(body, dict):
        raise APIError("request body must be a JSON object")
    _check_tree(body, max_depth)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        raise APIError(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")), 400, loc or None) from None


def _check_tree(body: Any, max_depth: int) -> None:
    """Depth limit and lone-surrogate check over a parsed JSON value, iteratively."""
    stack = [(body, 1, "")]
    while stack:
        x, depth, where = stack.pop()
        if isinstance(x, str):
            if _SURROGATE.search(x):
                raise APIError(f"{where or 'body'}: the string contains a lone UTF-16 surrogate (not valid Unicode)",
                               param=where or None)
        elif isinstance(x, (dict, list)):
            if depth > max_depth:
                raise APIError(f"request body nests JSON deeper than {max_depth} levels")
            items = x.items() if isinstance(x, dict) else enumerate(x)
            for k, v in items:
                if isinstance(k, str) and _SURROGATE.search(k):
                    raise APIError(f"{where or 'body'}: a key contains a lone UTF-16 surrogate (not valid Unicode)")
                if isinstance(v, (str, dict, list)):
                    stack.append((v, depth + 1, f"{where}.{k}" if where else str(k)))


def _one_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else "unreadable"
