"""Guided JSON always closes within max_tokens (issue 25, use item 5), over HTTP with the random tiny
model: schemas that leave strings, arrays, numbers and extra properties open, a small max_tokens,
sampled output; every answer parses and validates against the schema as the client sent it."""

from __future__ import annotations

import json

import httpx
import pytest

from serve_helpers import API_KEY, MODEL_NAME

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
OPEN = {"type": "object", "properties": {"city": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
                                          "n": {"type": "integer"}, "x": {"type": "number"}},
        "required": ["city", "tags"]}  # no additionalProperties: false, no maxLength / maxItems / bounds


def _post(server, path: str, body: dict) -> dict:
    r = httpx.post(f"{server.url}/{path}", json={"model": MODEL_NAME, **body}, headers=HEADERS, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("max_tokens", [24, 40])  # the required part alone takes 22 bytes
def test_open_schema_closes_within_max_tokens(server, max_tokens):
    for seed in range(4):
        out = _post(server, "completions", {"prompt": f"Record {seed}:", "max_tokens": max_tokens, "temperature": 1.0,
                                            "seed": seed, "guided_json": OPEN})
        text = out["choices"][0]["text"]
        jsonschema.validate(json.loads(text), OPEN)
        assert out["usage"]["completion_tokens"] <= max_tokens


def test_json_object_closes_within_max_tokens(server):
    for seed in range(3):
        out = _post(server, "chat/completions", {"messages": [{"role": "user", "content": "JSON please"}],
                                                 "max_tokens": 24, "temperature": 1.0, "seed": seed,
                                                 "response_format": {"type": "json_object"}})
        assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)


def test_named_tool_arguments_are_json_that_validates(server):
    params = {"type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
              "required": ["location"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    for seed in range(3):
        out = _post(server, "chat/completions", {
            "messages": [{"role": "user", "content": "Weather?"}], "tools": tools, "max_tokens": 20,
            "temperature": 1.0, "seed": seed, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
        call = out["choices"][0]["message"]["tool_calls"][0]["function"]
        assert call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), params)
