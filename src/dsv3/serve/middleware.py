"""Pure ASGI middleware of `dsv3 serve` (not BaseHTTPMiddleware, which would interfere with the
disconnect detection of streams).

- `AuthAndCount` (outermost): the bearer-key check on `/v1/*` and on the API description (`/docs`,
  `/redoc`, `/openapi.json`: it lists every route and field) and on the weight-sync routes
  (`weight_sync.py`); as vLLM, the tokenizer routes, /health and /metrics stay open. Also the
  per-endpoint status counts for /metrics.
- `BodyLimit`: reads a request body up to `max_request_bytes`, then answers 413 in the OpenAI shape;
  a bigger body is never held in memory (the rest is read and dropped, so the client gets the 413
  instead of a reset connection). The handlers get the body already read.
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from dsv3.serve import weight_sync
from dsv3.serve.metrics import ServerMetrics
from dsv3.serve.protocol import APIError

CONTROL = frozenset(weight_sync.ROUTES)  # weight sync and pause / resume: always behind the key
ROUTES = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
          "/tokenizer_info", "/health", "/metrics"} | CONTROL
_DESCRIPTION = ("/docs", "/redoc", "/openapi.json")  # FastAPI's API description (and /docs/oauth2-redirect)
_DRAIN_BYTES = 256 << 20  # past this much of an oversized body, stop reading it and close the connection


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(APIError(message, status, param).body(), status_code=status)


class AuthAndCount:
    def __init__(self, app, api_key: str | None, metrics: ServerMetrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ROUTES else "other"  # bounded label set
        if self.api_key and (path.startswith("/v1") or path in CONTROL or path.startswith(_DESCRIPTION)):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode("utf-8", "replace"), self.api_key.encode()):
                self.metrics.http_request(endpoint, 401)
                msg = "Incorrect API key provided or missing 'Authorization: Bearer <key>' header."
                return await error_response(401, msg)(scope, receive, send)
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


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                too_big = True
            if not too_big:
                chunks.append(body)
            elif size > _DRAIN_BYTES:
                break
            if not message.get("more_body", False):
                break
        if too_big:
            msg = (f"request body is larger than this server's limit of {self.max_bytes} bytes "
                   f"(dsv3 serve --max-request-bytes)")
            return await error_response(413, msg)(scope, receive, send)
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect detection as usual

        await self.app(scope, replay, send)
