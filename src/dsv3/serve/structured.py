"""Structured output in the API: request fields -> `SamplingParams.guided_decoding`.

Accepted (one at a time, else 400):
  response_format {"type": "json_object"}                       any JSON object
  response_format {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
  guided_json (a schema, or its JSON text), guided_regex, guided_choice   vLLM's extra body
  tool_choice "required" / a named function                     the tool plan's schema (`tools.py`)
A schema is checked with `jsonschema` before anything starts, so an invalid one is a 400 naming
the field; the engine's grammar library enforces it while decoding (`dsv3.infer`).
"""

from __future__ import annotations

import json
from typing import Any

from dsv3.serve.protocol import APIError


def _schema(value: Any, param: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise APIError(f"{param}: not valid JSON ({e})", param=param) from None
    if not isinstance(value, dict):
        raise APIError(f"{param}: a JSON schema must be an object, got {type(value).__name__}", param=param)
    try:
        import jsonschema
    except ImportError:
        raise APIError("JSON-schema output needs the jsonschema package: pip install 'dsv3[serve]'", 500) from None
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.exceptions.SchemaError as e:
        raise APIError(f"{param}: invalid JSON schema: {e.message}", param=param) from None
    return value


def guided_spec(req, tool_schema: dict | None = None) -> dict | None:
    """The request's structured-output constraint as GuidedDecodingParams keyword arguments."""
    found: list[tuple[str, dict]] = []
    rf = req.response_format
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js:
                raise APIError("response_format.json_schema must be {'name': ..., 'schema': {...}, 'strict': ...}",
                               param="response_format")
            found.append(("response_format", {"json": _schema(js["schema"], "response_format.json_schema.schema")}))
        elif kind != "text":
            raise APIError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           param="response_format")
    if req.guided_json is not None:
        found.append(("guided_json", {"json": _schema(req.guided_json, "guided_json")}))
    if req.guided_regex is not None:
        if not req.guided_regex:
            raise APIError("guided_regex must not be empty", param="guided_regex")
        found.append(("guided_regex", {"regex": req.guided_regex}))
    if req.guided_choice is not None:
        if not req.guided_choice or not all(isinstance(c, str) and c for c in req.guided_choice):
            raise APIError("guided_choice must be a non-empty list of non-empty strings", param="guided_choice")
        found.append(("guided_choice", {"choice": list(req.guided_choice)}))
    if tool_schema is not None:
        found.append(("tool_choice", {"json": tool_schema}))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise APIError(f"give at most one output constraint; this request has {names}", param=found[1][0])
    return found[0][1] if found else None


def guided_params(spec: dict | None):
    """kwargs -> the engine's GuidedDecodingParams (None stays None)."""
    if spec is None:
        return None
    from dsv3.infer.sampling import GuidedDecodingParams

    return GuidedDecodingParams(**spec)
