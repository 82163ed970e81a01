"""The FastAPI app: thin routes over the per-endpoint handlers (`dsv3.serve.handlers`), errors in
the OpenAI shape, the API-key check and the body limit (`middleware.py`).

`build_app(engine, ...)` takes an `LLMEngine` (or an `AsyncEngine`); the app's `lifespan` starts
the engine thread on startup and stops it on shutdown, so a test can run the app in-process.

Error policy: every error leaves as `{"error": {"message", "type", "param", "code"}}`. Malformed
requests (bad JSON, too deep, lone surrogates, bad fields, over a limit) -> 400, too large -> 413,
unknown model -> 404, missing/wrong key -> 401, unknown route -> 404; 500 only for a real fault,
with a message that names no exception class (the traceback goes to the log). Nothing a request
does can stop the server or the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv3.errors import UserError
from dsv3.serve.async_engine import AsyncEngine
from dsv3.serve.handlers.chat import OpenAIServingChat
from dsv3.serve.handlers.completions import OpenAIServingCompletion
from dsv3.serve.handlers.models import OpenAIServingModels
from dsv3.serve.handlers.tokenize import OpenAIServingTokenization
from dsv3.serve.limits import ServerLimits
from dsv3.serve.metrics import ServerMetrics
from dsv3.serve.middleware import AuthAndCount, BodyLimit, error_response
from dsv3.serve.weight_sync import add_routes as add_weight_sync_routes
from dsv3.serve.protocol import (
    APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, parse_request,
)

log = logging.getLogger("dsv3.serve")


async def _parse(request: Request, model, limits: ServerLimits):
    """The body (already read, at most --max-request-bytes, by `BodyLimit`) -> `model`, off the event loop."""
    raw = await request.body()
    return await asyncio.to_thread(parse_request, raw, model, limits.max_json_depth)


async def _until_disconnect(request: Request, coro):
    """Run `coro`; cancel it if the client disconnects first (its engine requests get aborted), log one
    line and return None (no traceback: a client that goes away is not a server fault)."""
    task = asyncio.ensure_future(coro)
    gone = asyncio.Event()

    async def watch() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                gone.set()
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if not gone.is_set() or asyncio.current_task().cancelling():  # this handler itself is cancelled
            raise
        client = request.client.host if request.client else "?"
        log.info("%s %s: the client (%s) disconnected before the response; its request was aborted",
                 request.method, request.url.path, client)
        return None
    finally:
        watcher.cancel()


async def _generate(request: Request, coro, stream: bool) -> Response:
    """Run a generation handler. Streams: StreamingResponse itself cancels the generator when the
    client goes away. Otherwise a disconnect watcher cancels the handler. An engine failure
    becomes an OpenAI-shaped 500 for this request only."""
    try:
        result = await (coro if stream else _until_disconnect(request, coro))
    except APIError:
        raise
    except Exception as e:
        err = APIError.of(e)
        if err.status >= 500:
            log.exception("generation failed")
        raise err from None
    return _respond(result)


def _respond(result: Any) -> Response:
    if result is None:  # the client went away (`_until_disconnect`): 499, nginx's "client closed request"
        return Response(status_code=499)
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def build_app(engine, model_name: str, api_key: str | None = None, limits: ServerLimits | None = None,
              reasoning_parser: str | None = None, tool_call_parser: str | None = None) -> FastAPI:
    """`api_key` None: no key; an empty key is refused (it would look like auth and check nothing)."""
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty: give a non-empty key, or leave --api-key and $DSV3_API_KEY unset "
                        "to serve without one")
    limits = limits or ServerLimits()
    aengine = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine)
    metrics = ServerMetrics(model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(aengine.prepare_guided)
        aengine.start()
        try:
            yield
        finally:
            aengine.shutdown()

    app = FastAPI(title="dsv3 OpenAI-compatible server", lifespan=lifespan)
    args = (aengine, model_name, metrics, limits)
    chat_h = OpenAIServingChat(*args, reasoning_parser=reasoning_parser, tool_call_parser=tool_call_parser)
    completion_h = OpenAIServingCompletion(*args)
    models_h, tokenize_h = OpenAIServingModels(*args), OpenAIServingTokenization(*args)
    app.state.engine, app.state.metrics = aengine, metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        err = APIError.of(e)
        return JSONResponse(err.body(), status_code=err.status)

    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    app.add_middleware(AuthAndCount, api_key=api_key, metrics=metrics)  # added last: runs first

    @app.get("/health")
    async def health():
        return Response(status_code=200 if aengine.is_running else 503)

    @app.get("/metrics")
    async def prometheus():
        text = metrics.render(aengine.stats.running, aengine.stats.cache, aengine.stats.engine)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return models_h.models()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest, limits)
        return await _generate(request, completion_h.completions(req), req.stream)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await _parse(request, ChatCompletionRequest, limits)
        return await _generate(request, chat_h.chat(req), req.stream)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await _parse(request, TokenizeRequest, limits)
        tokenize_h.check_model(req.model)
        return await tokenize_h.tokenize(req)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await _parse(request, DetokenizeRequest, limits)
        tokenize_h.check_model(req.model)
        return tokenize_h.detokenize(req)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return tokenize_h.tokenizer_info()

    add_weight_sync_routes(app, aengine, api_key, limits.max_json_depth)

    return app
