"""The FastAPI app: thin routes over the per-endpoint handlers (`dsv3.serve.handlers`), errors in the OpenAI shape, API-key check.

`build_app(engine, ...)` takes an `LLMEngine` (or an `AsyncEngine`); the app's `lifespan` starts
the engine thread on startup and stops it on shutdown, so a test can run the app in-process.

Error policy: every error leaves as `{"error": {"message", "type", "param", "code"}}`. Bad JSON or
fields -> 400, unknown model -> 404, missing/wrong key -> 401, unknown route -> 404, anything
unexpected -> 500 (logged). Nothing a request does can stop the server or the engine thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv3.serve.async_engine import AsyncEngine
from dsv3.serve.handlers.chat import OpenAIServingChat
from dsv3.serve.handlers.completions import OpenAIServingCompletion
from dsv3.serve.handlers.models import OpenAIServingModels
from dsv3.serve.handlers.tokenize import OpenAIServingTokenization
from dsv3.serve.metrics import ServerMetrics
from dsv3.serve.protocol import (
    APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
)

log = logging.getLogger("dsv3.serve")


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(APIError(message, status, param).body(), status_code=status)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    return (f"{loc}: {err.get('msg')}" if loc else str(err.get("msg"))), (loc or None)


async def _parse(request: Request, model):
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        msg, param = _validation_message(e)
        raise APIError(msg, 400, param) from None


async def _until_disconnect(request: Request, coro):
    """Run `coro`; cancel it if the client disconnects first (its engine requests get aborted)."""
    task = asyncio.ensure_future(coro)

    async def watch() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
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
        log.exception("generation failed")
        raise APIError(f"{type(e).__name__}: {e}", 500) from None
    return _respond(result)


def _respond(result: Any) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _AuthAndCount:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which would interfere with disconnect
    detection of streams): bearer-key check on /v1/*, and per-endpoint status counts."""

    ROUTES = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
              "/tokenizer_info", "/health", "/metrics"}

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.ROUTES else "other"  # bounded label set
        if self.api_key and path.startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                self.metrics.http_request(endpoint, 401)
                msg = "Incorrect API key provided or missing 'Authorization: Bearer <key>' header."
                return await _error(401, msg)(scope, receive, send)
        status = 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.http_request(endpoint, status)


def build_app(engine, model_name: str, api_key: str | None = None, model_root: str | None = None,
              reasoning_parser: str | None = None) -> FastAPI:
    aengine = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine)
    metrics = ServerMetrics(model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start()
        try:
            yield
        finally:
            aengine.shutdown()

    app = FastAPI(title="dsv3 OpenAI-compatible server", lifespan=lifespan)
    args = (aengine, model_name, metrics, model_root)
    chat_h = OpenAIServingChat(*args, reasoning_parser=reasoning_parser)
    completion_h = OpenAIServingCompletion(*args)
    models_h, tokenize_h = OpenAIServingModels(*args), OpenAIServingTokenization(*args)
    app.state.engine, app.state.metrics = aengine, metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, f"internal error: {type(e).__name__}: {e}")

    app.add_middleware(_AuthAndCount, api_key=api_key, metrics=metrics)

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
        req = await _parse(request, CompletionRequest)
        return await _generate(request, completion_h.completions(req), req.stream)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await _parse(request, ChatCompletionRequest)
        return await _generate(request, chat_h.chat(req), req.stream)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await _parse(request, TokenizeRequest)
        tokenize_h.check_model(req.model)
        return tokenize_h.tokenize(req)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await _parse(request, DetokenizeRequest)
        tokenize_h.check_model(req.model)
        return tokenize_h.detokenize(req)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return tokenize_h.tokenizer_info()

    return app
