"""Reasoning output, tool calls and structured output through real uvicorn and the official `openai`
client, on the tiny random-weight model with the real tokenizer. Output the model would not write on
its own (tags, tool-call tokens) is forced with guided decoding (`guided_choice`), so the whole
path runs: grammar -> engine -> parsers -> response."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serve_helpers import API_KEY, MODEL_NAME, ServerThread

BEGIN, END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{}\n```json\n{}\n```<｜tool▁call▁end｜>"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {},
                                                                      "additionalProperties": False}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(engine, tiny_model_dir):
    from dsv3.serve.app import build_app

    app = build_app(engine, MODEL_NAME, api_key=API_KEY, reasoning_parser="deepseek_r1")
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)


def _stream(client, **kw) -> tuple[dict, str | None, list]:
    """Join a streamed chat choice: content, reasoning, tool calls (by index), finish reason, chunks."""
    got = {"content": "", "reasoning_content": "", "tool_calls": {}}
    finish, usage = None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            d = ch.delta
            got["content"] += d.content or ""
            got["reasoning_content"] += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                slot = got["tool_calls"].setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = slot["id"] or tc.id
                slot["name"] += (tc.function.name or "") if tc.function else ""
                slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = ch.finish_reason or finish
    got["tool_calls"] = [got["tool_calls"][i] for i in sorted(got["tool_calls"])]
    return got, finish, usage


def _full(client, **kw):
    r = client.chat.completions.create(**kw)
    m = r.choices[0].message
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in m.tool_calls or []]
    return {"content": m.content or "", "reasoning_content": getattr(m, "reasoning_content", None) or "",
            "tool_calls": calls}, r.choices[0].finish_reason, r.usage


def _same(a: dict, b: dict) -> bool:
    strip = lambda d: {**d, "tool_calls": [{k: v for k, v in c.items() if k != "id"} for c in d["tool_calls"]]}
    return strip(a) == strip(b)


# ------------------------------------------------------------------------------------- reasoning
def test_reasoning_unforced_output_is_all_reasoning(client):
    """Random text has no </think>: all of it is reasoning (the template-opened case), max_tokens counts it."""
    kw = dict(model=MODEL_NAME, messages=USER, max_tokens=8, temperature=0)
    full, finish, usage = _full(client, **kw)
    assert full["reasoning_content"] and full["content"] == "" and finish == "length"
    assert usage.completion_tokens == 8
    streamed, sfinish, _ = _stream(client, **kw)
    assert streamed == full and sfinish == finish


@pytest.mark.parametrize("text, reasoning, content", [
    ("<think>\nAdd them.\n</think>\n\nIt is 4.", "\nAdd them.\n", "\n\nIt is 4."),
    # under a grammar constraint only output that opens with <think> has a reasoning part (without a
    # constraint the no-opening-tag form splits: test_reasoning_unforced_..., and tests/serve/test_parsers.py)
    ("Add them.</think>It is 4.", "", "Add them.</think>It is 4."),
    ('{"a": 1}', "", '{"a": 1}'),
])
def test_reasoning_forced_split(client, text, reasoning, content):
    kw = dict(model=MODEL_NAME, messages=USER, max_tokens=40, temperature=0, extra_body={"guided_choice": [text]})
    full, finish, _ = _full(client, **kw)
    assert (full["reasoning_content"], full["content"], finish) == (reasoning, content, "stop")
    streamed, sfinish, _ = _stream(client, **kw)
    assert streamed == full and sfinish == finish


# ------------------------------------------------------------------------------------------ tools
def test_tool_auto_forced_calls_streamed_equal_non_streamed(client):
    text = ("<think>Need the weather tool.</think>Let me check." + BEGIN
            + CALL.format("get_weather", '{"city": "Paris", "unit": "celsius"}') + "\n" + CALL.format("now", "{}") + END)
    kw = dict(model=MODEL_NAME, messages=USER, tools=[WEATHER, NOW], max_tokens=120, temperature=0,
              extra_body={"guided_choice": [text]})
    full, finish, _ = _full(client, **kw)
    assert finish == "tool_calls" and full["content"] == "Let me check."
    assert full["reasoning_content"] == "Need the weather tool."
    assert [(c["name"], json.loads(c["arguments"])) for c in full["tool_calls"]] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("now", {})]
    streamed, sfinish, _ = _stream(client, **kw)
    assert _same(streamed, full) and sfinish == "tool_calls"
    assert all(c["id"] for c in streamed["tool_calls"])
    one, finish1, _ = _full(client, **{**kw, "parallel_tool_calls": False})
    assert [c["name"] for c in one["tool_calls"]] == ["get_weather"] and finish1 == "tool_calls"


def test_tool_result_turn_continues_and_renders_as_template(client, engine):
    from dsv3.serve.tools import plan_tools, with_tool_prompt

    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    msgs = USER + [{"role": "assistant", "content": None, "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=msgs, tools=[WEATHER], max_tokens=4, temperature=0)
    rendered = engine.tokenizer.apply_chat_template(with_tool_prompt(msgs, plan_tools([WEATHER], None, None)),
                                                    tokenize=True)
    assert r.usage.prompt_tokens == len(rendered)
    text = engine.tokenizer.decode(rendered, skip_special_tokens=False)
    assert text.endswith('<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{"temperature": 18}<｜tool▁output▁end｜>'
                         '<｜tool▁outputs▁end｜>') and "## Tools" in text


def test_tool_choice_named_gives_schema_valid_arguments(client):
    jsonschema = pytest.importorskip("jsonschema")
    kw = dict(model=MODEL_NAME, messages=USER, tools=[WEATHER, NOW], max_tokens=60, temperature=1.0, seed=3,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    full, finish, _ = _full(client, **kw)
    assert finish == "stop" and full["content"] == "" and len(full["tool_calls"]) == 1
    assert full["tool_calls"][0]["name"] == "get_weather"
    jsonschema.validate(json.loads(full["tool_calls"][0]["arguments"]), WEATHER["function"]["parameters"])
    streamed, sfinish, _ = _stream(client, **kw)
    assert _same(streamed, full) and sfinish == finish  # seeded: the same sample


def test_tool_choice_required(client):
    jsonschema = pytest.importorskip("jsonschema")
    kw = dict(model=MODEL_NAME, messages=USER, tools=[WEATHER, NOW], max_tokens=120, temperature=1.0, seed=5,
              tool_choice="required", parallel_tool_calls=False)
    full, finish, _ = _full(client, **kw)
    assert finish == "tool_calls" and len(full["tool_calls"]) == 1
    call = full["tool_calls"][0]
    schema = {"get_weather": WEATHER, "now": NOW}[call["name"]]["function"]["parameters"]
    jsonschema.validate(json.loads(call["arguments"]), schema)
    streamed, sfinish, _ = _stream(client, **kw)
    assert _same(streamed, full) and sfinish == finish


@pytest.mark.parametrize("body, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"extra": {"guided_json": {"type": "object", "properties": {"a": {"minimum": "zero"}}}}}, "guided_json"),
    ({"extra": {"guided_choice": []}}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "extra": {"guided_regex": "a+"}}, "guided_regex"),
])
def test_bad_tools_and_formats_are_400(client, body, param):
    extra = body.pop("extra", None)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=4, extra_body=extra, **body)
    assert e.value.body["param"] == param, e.value.body


# ------------------------------------------------------------------------------ structured output
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "enum": [0.5, 1.25, 2.75]},  # bounded: free digits never end on random weights
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
            "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "score", "role", "tags", "address", "active"],
    "additionalProperties": False,
}


def test_json_schema_twenty_requests_validate(client):
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def one(i: int):
        r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": f"Person {i}"}],
                                           response_format=fmt, max_tokens=200, temperature=1.0, seed=i)
        return r.choices[0].finish_reason, r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(20)))
    for finish, content in results:
        assert finish == "stop", content
        jsonschema.validate(json.loads(content), PERSON)
    assert len({c for _, c in results}) > 1  # sampled, not one fixed answer


def test_json_object_and_completions_guided(client, server):
    """json_object: any object, so a random model may write one longer than max_tokens (then it is a cut-off
    prefix, finish_reason "length"); every finished one must parse, and most finish."""
    r = client.chat.completions.create(model=MODEL_NAME, messages=USER, response_format={"type": "json_object"},
                                       max_tokens=170, temperature=1.0, seed=0, n=8)
    done = [c.message.content for c in r.choices if c.finish_reason == "stop"]
    assert len(done) >= 4, [c.finish_reason for c in r.choices]
    assert all(isinstance(json.loads(t), dict) for t in done)
    c = client.completions.create(model=MODEL_NAME, prompt="Pick:", max_tokens=10, temperature=1.0, seed=2,
                                  extra_body={"guided_choice": ["red", "green", "blue"]})
    assert c.choices[0].text in {"red", "green", "blue"}
    c = client.completions.create(model=MODEL_NAME, prompt="Code:", max_tokens=10, temperature=1.0, seed=2,
                                  extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"})
    import re

    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", c.choices[0].text), c.choices[0].text
    r = httpx.post(server.url + "/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                   json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 4, "guided_json": "{not json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_json"
